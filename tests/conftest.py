"""Shared test helpers: paths to the project's default model and to the real third-party models, and the
small models the tests generate."""

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "digits_cnn.onnx"
SHARED_MODELS = ROOT.parent / "shared" / "models"


def shared_model(name: str) -> Path:
    """Path of a model in ../shared/models, skipping the test when a user's clone lacks that folder."""
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/models is only in the developers' checkout)")
    return path


def shared_model_names() -> list[str]:
    return sorted(path.name for path in SHARED_MODELS.glob("*.onnx")) if SHARED_MODELS.exists() else []


# ----------------------------------------------------------------------------------- building models


def float_input(name: str, shape) -> onnx.ValueInfoProto:
    """A float tensor's value info (`shape` None: unknown), for a graph's inputs and outputs."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def onnx_model(nodes, inputs, outputs, initializers=None, opset: int = 13, **model_fields) -> onnx.ModelProto:
    """A model of `nodes` at one default-domain opset; `initializers` maps names to arrays."""
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(array), name)
                               for name, array in (initializers or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **model_fields)


def export_classic(module, example, path, **options):
    """torch's classic (TorchScript) exporter, on purpose: its default (dynamo) writes opset 18+ graphs."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the classic exporter's deprecation notices
        torch.onnx.export(module, (example,), str(path), dynamo=False, **options)
    return path


# --------------------------------------------------------------------------- one rectifier of each kind

# The generated models hold one rectifier of each kind and a Clip(-1, 1), which is no rectifier and must stay.
# The helper-made ones have two rectifier Clips (with and without max), the torch export one (ReLU6).
GENERATED_COUNTS = Counter({"Relu": 1, "LeakyRelu": 1, "PRelu": 1, "Clip": 2})
EXPORTED_COUNTS = GENERATED_COUNTS - Counter({"Clip": 1})
GENERATED_INPUT_SHAPE = (1, 3, 6, 6)
GENERATED = ["helper-opset13", "helper-opset17", "torch-export-opset17"]


def helper_model(opset: int) -> onnx.ModelProto:
    """Conv, then each rectifier kind, each followed by a Conv, then Clip(-1, 1)."""
    rng = np.random.default_rng(0)
    activations = [
        helper.make_node("Relu", ["x1"], ["y1"], name="relu"),
        helper.make_node("LeakyRelu", ["x2"], ["y2"], name="leaky", alpha=0.1),
        helper.make_node("PRelu", ["x3", "prelu_slope"], ["y3"], name="prelu"),
        helper.make_node("Clip", ["x4", "zero", "six"], ["y4"], name="relu6"),
        helper.make_node("Clip", ["x5", "zero"], ["y5"], name="clip_min0"),
        helper.make_node("Clip", ["x6", "minus_one", "one"], ["y6"], name="clip_symmetric"),
    ]
    constants = {"zero": 0, "six": 6, "minus_one": -1, "one": 1, "prelu_slope": [[[0.05]], [[0.2]], [[0.4]], [[0.7]]]}
    initializers = {name: np.array(value, dtype=np.float32) for name, value in constants.items()}
    nodes = []
    source = "image"
    for index, activation in enumerate(activations, start=1):
        name, channels = f"conv{index}", GENERATED_INPUT_SHAPE[1] if index == 1 else 4
        initializers[f"{name}_w"] = rng.normal(0, 0.6, (4, channels, 3, 3)).astype(np.float32)
        nodes += [helper.make_node("Conv", [source, f"{name}_w"], [activation.input[0]], name=name, pads=[1] * 4),
                  activation]
        source = activation.output[0]
    return onnx_model(nodes, [float_input("image", GENERATED_INPUT_SHAPE)], [float_input(source, None)],
                      initializers, opset)


def torch_export_model(path):
    """The same rectifiers as helper_model's, as torch modules, through the classic exporter."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1),
              nn.Conv2d(4, 4, 3, padding=1), nn.PReLU(4, init=0.2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU6(),
              nn.Conv2d(4, 4, 3, padding=1), nn.Hardtanh(-1, 1), nn.Flatten(),
              nn.Linear(4 * 6 * 6, 5)]
    module = nn.Sequential(*layers).eval()
    return export_classic(module, torch.randn(GENERATED_INPUT_SHAPE), path, opset_version=17)


def write_generated_model(kind: str, path):
    """One of GENERATED, written to `path`."""
    if kind == "torch-export-opset17":
        torch_export_model(path)
    else:
        onnx.save(helper_model(int(kind.removeprefix("helper-opset"))), str(path))
    return path
