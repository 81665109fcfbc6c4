"""The embedded default model (models/digits_cnn.onnx) and its held-out data; needs only onnx, onnxruntime, numpy."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL_PATH = MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def model():
    return onnx.load(MODEL_PATH)


def test_heldout_accuracy():
    data = np.load(MODELS / "digits_heldout.npz")
    x, y = data["x"].astype(np.float32), data["y"]
    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x})
    assert logits.shape == (len(y), 10)
    assert (logits.argmax(axis=1) == y).mean() >= 0.95


def test_layers_are_named_nodes_with_same_named_outputs(model):
    outputs = {node.name: list(node.output) for node in model.graph.node}
    for name in ["conv1", "conv2", "conv3", "fc", "logits"]:
        assert outputs.get(name) == [name]


def test_input_is_image_nchw_with_dynamic_batch(model):
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image"
    assert [d.dim_value for d in dims[1:]] == [1, 32, 32]
    assert dims[0].dim_param and not dims[0].dim_value


def test_file_is_small():
    assert MODEL_PATH.stat().st_size < 1_000_000


def test_has_four_relus(model):
    assert Counter(node.op_type for node in model.graph.node)["Relu"] == 4
