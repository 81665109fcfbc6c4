"""`onnxproxy inspect`: the report lists what the model holds and what onnxproxy made of it."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from cli import main
from conftest import float_input, onnx_model, shared_model

RNG = np.random.default_rng(0)
RECTIFIERS = ["relu", "clip_at_zero", "leaky", "prelu"]  # the node names _rectifier_zoo gives them


def _weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _rectifier_zoo() -> onnx.ModelProto:
    """Conv layers with every kind of rectifier, and a Clip that is not one (its minimum is below zero)."""
    initializers = {"W1": _weights(4, 3, 3, 3), "W2": _weights(6, 4, 3, 3), "W3": _weights(6, 6, 1, 1),
                    "zero": np.array(0.0, np.float32), "minus_one": np.array(-1.0, np.float32),
                    "slope": _weights(6, 1, 1), "Wfc": _weights(6, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["conv1_out"], "conv1"),
        helper.make_node("Relu", ["conv1_out"], ["relu_out"], "relu"),
        helper.make_node("Conv", ["relu_out", "W2"], ["conv2_out"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["conv2_out", "zero"], ["clip0_out"], "clip_at_zero"),
        helper.make_node("Clip", ["clip0_out", "minus_one"], ["clip1_out"], "clip_below_zero"),
        helper.make_node("LeakyRelu", ["clip1_out"], ["leaky_out"], "leaky", alpha=0.2),
        helper.make_node("Conv", ["leaky_out", "W3"], ["conv3_out"], "conv3"),
        helper.make_node("PRelu", ["conv3_out", "slope"], ["prelu_out"], "prelu"),
        helper.make_node("GlobalAveragePool", ["prelu_out"], ["pooled"], "pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
        helper.make_node("MatMul", ["flat", "Wfc"], ["logits"], "fc"),
    ]
    return onnx_model(nodes, [float_input("x", ["N", 3, 10, 10])], [float_input("logits", None)], initializers,
                      producer_name="unit-test", producer_version="4.2")


@pytest.fixture
def zoo_path(tmp_path):
    path = tmp_path / "zoo.onnx"
    onnx.save(_rectifier_zoo(), str(path))
    return path


def _inspect(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def _json_report(*args) -> dict:
    result = _inspect(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_text_report_lists_every_node_and_marks_the_rectifiers(zoo_path):
    result = _inspect(zoo_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    model = _rectifier_zoo()
    header = next(index for index, line in enumerate(lines) if line.startswith("#"))
    table = lines[header + 1: lines.index("", header)]
    rows = {line.split()[2]: line for line in table}
    assert list(rows) == [node.name for node in model.graph.node]
    assert [name for name, row in rows.items() if row.endswith(" R")] == RECTIFIERS
    assert "unit-test 4.2" in result.output
    assert "torch conversion matches onnxruntime" in lines[-1]


def test_json_report_gives_shapes_channels_counts_and_inputs(zoo_path):
    report = _json_report(zoo_path)
    model = _rectifier_zoo()
    assert [node["name"] for node in report["nodes"]] == [node.name for node in model.graph.node]
    assert report["op_counts"]["Conv"] == sum(node.op_type == "Conv" for node in model.graph.node)
    assert sum(report["op_counts"].values()) == len(model.graph.node)
    assert report["rectifiers"] == len(RECTIFIERS)
    nodes = {node["name"]: node for node in report["nodes"]}
    assert nodes["conv1"]["shape"] == ["N", 4, 8, 8]  # 10x10, 3x3 kernel, no padding
    assert nodes["conv2"]["shape"] == ["N", 6, 8, 8]  # padded
    assert nodes["fc"]["shape"][1] == 5
    for node in report["nodes"]:
        assert node["channels"] == (node["shape"][1] if len(node["shape"]) >= 2 else None)
    assert report["inputs"] == [{"name": "x", "shape": ["N", 3, 10, 10], "dtype": "float32", "layout": "NCHW"}]
    assert report["input"] == "x" and report["outputs"][0]["name"] == "logits"
    assert report["opsets"] == {"ai.onnx": 13}
    assert report["conversion"]["matches_onnxruntime"] and report["conversion"]["max_abs_diff"] < 1e-4


def test_node_option_shows_the_resolved_node(zoo_path):
    report = _json_report(zoo_path, "--node", "CLIP0_OUT")  # a tensor name, case-insensitively
    assert [node["name"] for node in report["nodes"]] == ["clip_at_zero"]


@pytest.mark.parametrize("spec, fragments", [
    ("conv", ["ambiguous", "conv1", "conv2", "conv3"]),
    ("conv9", ["no such node", "Closest"]),
])
def test_bad_node_exits_2_with_candidates_and_hint(zoo_path, spec, fragments):
    result = _inspect(zoo_path, "--node", spec)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "onnxproxy inspect" in result.output
    for fragment in fragments:
        assert fragment in result.output


def test_unconvertible_model_is_reported_then_fails_listing_every_op(tmp_path):
    nodes = [helper.make_node("Hardmax", ["x"], ["h1"], "hard1"), helper.make_node("Hardmax", ["h1"], ["h2"], "hard2"),
             helper.make_node("Shrink", ["h2"], ["y"], "shrink")]
    path = tmp_path / "odd.onnx"
    onnx.save(onnx_model(nodes, [float_input("x", ["N", 5])], [float_input("y", None)]), str(path))
    result = _inspect(path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert all(name in result.output for name in ("hard1", "hard2", "shrink"))  # the node list still shows
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "Hardmax x2" in error and "Shrink x1" in error


def test_unnamed_nodes_show_generated_names(tmp_path):
    model = _rectifier_zoo()
    for node in model.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    report = _json_report(path)
    assert [node["name"] for node in report["nodes"]] == [f"{node.op_type}_{index}"
                                                          for index, node in enumerate(model.graph.node)]


def test_keras_model_report_shows_repairs_and_nhwc_input():
    report = _json_report(shared_model("mnist_cnn_keras2onnx_unsorted.onnx"))
    assert "sorted nodes topologically" in report["repairs"]
    assert report["inputs"][0]["layout"] == "NHWC"


def test_vit_report_has_the_batchnorm_shapes_onnx_alone_cannot_infer():
    report = _json_report(shared_model("cifar10_vit_pgd_2_3_16.onnx"))
    norms = [node for node in report["nodes"] if node["op_type"] == "BatchNormalization"]
    assert norms and all(len(node["shape"]) >= 2 for node in norms)  # onnx2torch needs their rank
