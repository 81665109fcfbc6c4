"""`onnxproxy maximize` end to end: the files it writes, reproducibility, compare, image layouts, and every
bad input of the issue (clear message, right exit status, no traceback, nothing half-written).

Small models are generated here so that the layouts and failure modes run without ../shared/models."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import helper
from PIL import Image

from cli import main
from conftest import DEFAULT_MODEL, float_input, onnx_model, shared_model
from onnxproxy import report, run
from onnxproxy.graph import load_model

FAST = ["--steps", "4", "--seeds", "1", "--quiet"]


def maximize(*args):
    return CliRunner().invoke(main, ["maximize", *map(str, args)])


def document_of(folder) -> dict:
    return json.loads((folder / "results.json").read_text(), parse_constant=_refuse)


def _refuse(token):
    raise ValueError(f"{token} is not JSON")


def assert_usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


# ------------------------------------------------------------------------------------------ model builders


def save_model(path, nodes, input_shape, output, initializers):
    initializers = {name: np.asarray(value, np.float32) for name, value in initializers.items()}
    onnx.save(onnx_model(nodes, [float_input("x", ["N", *input_shape])], [float_input(output, None)], initializers,
                         ir_version=8), path)
    return path


def conv_classifier(path, input_shape, layout="NCHW"):
    """[Transpose to NCHW] -> conv -> relu -> pool -> flatten -> softmax, 4 classes."""
    channels = input_shape[-1] if layout == "NHWC" else input_shape[0]
    source = "x"
    nodes = []
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
        source = "x_nchw"
    nodes += [
        helper.make_node("Conv", [source, "W", "B"], ["conv"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Softmax", ["flat"], ["probabilities"], name="softmax", axis=1),
    ]
    weights = np.random.default_rng(0).standard_normal((4, channels, 3, 3))
    return save_model(path, nodes, input_shape, "probabilities", {"W": weights, "B": np.zeros(4)})


def overflowing(path):
    """Four units relu(x + b) * s: unit 2 is infinite for every input in [-1, 1], unit 3 from x3 > 0.64 on."""
    nodes = [helper.make_node("Add", ["x", "b"], ["shifted"], name="shift"),
             helper.make_node("Relu", ["shifted"], ["rectified"], name="rectify"),
             helper.make_node("Mul", ["rectified", "s"], ["scaled"], name="scale")]
    return save_model(path, nodes, [4], "scaled", {"b": [0, 0, 10, 0.5], "s": [1, 1, 3e38, 3e38]})


def without_rectifier(path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["dense"], name="dense"),
             helper.make_node("Tanh", ["dense"], ["tanh"], name="tanh")]
    return save_model(path, nodes, [6], "tanh", {"W": np.random.default_rng(1).standard_normal((6, 3))})


def with_constant_branch(path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["w", "w"], ["k"], name="constant_sum"),
             helper.make_node("Mul", ["r", "k"], ["product"], name="product")]
    return save_model(path, nodes, [4], "product", {"w": np.ones(4)})


# ---------------------------------------------------------------------------------------------- outputs


def test_run_on_the_embedded_model_writes_validated_files(tmp_path):
    out = tmp_path / "out"
    result = maximize("--units", "0-1", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    names = {path.name for path in out.iterdir()}
    assert names == {"unit000_portfolio.png", "unit001_portfolio.png", "grid.png", "results.json", "inputs.npz"}
    document = document_of(out)
    assert document["validated"] and all(record["validated"] for record in document["results"])
    assert "no unit given" not in result.stderr


def test_no_unit_means_unit_0_and_says_so(tmp_path):
    result = maximize(*FAST, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "maximizing unit 0 of conv3" in result.stderr
    assert [record["unit"] for record in document_of(tmp_path / "out")["results"]] == [0]


def test_json_document_has_the_issues_fields_and_inputs_rescore_with_onnxruntime(tmp_path):
    out = tmp_path / "out"
    result = maximize("--node", "conv3:2,5", *FAST, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout, parse_constant=_refuse)
    assert printed == document_of(out)
    assert {"model", "node", "tensor", "objective", "settings", "results", "validated"} <= set(printed)
    assert {"seed", "steps", "lr", "optimizer", "backward_slope", "input_range"} <= set(printed["settings"])
    assert {"onnxproxy", "torch", "onnx", "onnxruntime", "onnx2torch"} <= set(printed["settings"]["versions"])
    fields = {"unit", "method", "activation", "onnxruntime_activation", "validated", "initial_activation",
              "best_step", "image", "input"}
    assert all(fields <= set(record) for record in printed["results"])

    inputs = np.load(out / "inputs.npz")
    assert set(inputs.files) == {record["input"] for record in printed["results"]}
    exposed = onnx.load(DEFAULT_MODEL)
    exposed.graph.output.append(helper.make_empty_tensor_value_info("conv3"))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    for record in printed["results"]:
        array = inputs[record["input"]]
        assert array.dtype == np.float32 and array.shape == (1, 1, 32, 32)
        (conv3,) = session.run(["conv3"], {"image": array})
        assert conv3[0, record["unit"]].mean() == pytest.approx(record["onnxruntime_activation"], rel=1e-6)
        assert (out / record["image"]).is_file()


def test_same_seed_same_results_other_seed_other_results(tmp_path):
    def results(seed, name):
        result = maximize("--units", "0-1", *FAST, "--seeds", "2", "--seed", seed, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        return document_of(tmp_path / name)["results"]

    first = results(3, "a")
    assert results(3, "b") == first
    assert [record["activation"] for record in results(4, "c")] != [record["activation"] for record in first]


def test_compare_reports_both_methods_per_unit_and_the_gain(tmp_path):
    out = tmp_path / "out"
    result = maximize("--node", "conv3:0-1", "--method", "compare", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    document = document_of(out)
    by_key = {(record["unit"], record["method"]): record for record in document["results"]}
    assert set(by_key) == {(unit, method) for unit in (0, 1) for method in ("vanilla", "proxygrad")}
    for row in document["comparison"]:
        vanilla, proxygrad = by_key[row["unit"], "vanilla"], by_key[row["unit"], "proxygrad"]
        assert (row["vanilla"], row["proxygrad"]) == (vanilla["onnxruntime_activation"],
                                                      proxygrad["onnxruntime_activation"])
        assert row["gain"] == pytest.approx(row["proxygrad"] - row["vanilla"])
        assert vanilla["initial_activation"] == proxygrad["initial_activation"]  # one seed: the same start
    assert {f"unit00{unit}_{method}.png" for unit in (0, 1) for method in ("vanilla", "proxygrad")} <= {
        path.name for path in out.iterdir()}


# ----------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("input_shape, layout, mode, side", [
    ([8, 8, 3], "NHWC", "RGB", 128),
    ([1, 6, 6], "NCHW", "L", 132),
    ([5, 6, 6], "NCHW", "RGB", 132),
])
def test_images_show_the_input_as_the_model_sees_it(tmp_path, input_shape, layout, mode, side):
    model = conv_classifier(tmp_path / "model.onnx", input_shape, layout)
    out = tmp_path / "out"
    result = maximize(model, "--node", "conv:1", *FAST, "--input-range", "0", "2", "--out", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out / "unit001_portfolio.png")
    assert (image.mode, image.size) == (mode, (side, side))
    array = np.load(out / "inputs.npz")["unit001_portfolio"][0]
    channels_last = array if layout == "NHWC" else np.moveaxis(array, 0, -1)
    expected = np.round(np.clip(channels_last[:, :, :3] / 2, 0, 1) * 255)
    factor = side // channels_last.shape[0]
    shown = np.asarray(image)[::factor, ::factor].reshape(expected.shape)
    np.testing.assert_allclose(shown, expected, atol=1)


def test_shared_nhwc_grey_model(tmp_path):
    model = shared_model("mnist_cnn_tf2onnx_nhwc.onnx")
    out = tmp_path / "out"
    result = maximize(model, "--node", "conv2d/BiasAdd:0", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert document_of(out)["validated"]
    image = Image.open(out / "unit000_portfolio.png")
    assert (image.mode, image.size) == ("L", (140, 140))


# ---------------------------------------------------------------------------------------- warned, not refused


def test_softmax_target_is_warned_about(tmp_path):
    model = conv_classifier(tmp_path / "model.onnx", [1, 6, 6])
    result = maximize(model, "--node", "softmax:0", *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Softmax" in result.stderr and "logit" in result.stderr


def test_without_rectifier_proxygrad_equals_vanilla_and_says_so(tmp_path):
    model = without_rectifier(tmp_path / "model.onnx")
    out = tmp_path / "out"
    result = maximize(model, "--node", "tanh:0-2", "--method", "compare", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert "ProxyGrad equals ordinary gradient ascent" in result.stderr
    assert all(row["gain"] == 0 for row in document_of(out)["comparison"])


def test_nonfinite_units_stop_and_are_reported_while_the_others_go_on(tmp_path):
    model = overflowing(tmp_path / "model.onnx")
    out = tmp_path / "out"
    result = maximize(model, "--node", "scale:0-3", "--method", "proxygrad", "--steps", "6", "--seeds", "2",
                      "--optimizer", "sgd", "--out", out)
    assert result.exit_code == 0, result.output
    document = document_of(out)  # strict JSON: no NaN or Infinity tokens
    records = {record["unit"]: record for record in document["results"]}
    for unit in (0, 1):
        assert records[unit]["status"] == "ok" and records[unit]["validated"]
        assert records[unit]["activation"] > records[unit]["initial_activation"]
    assert records[2]["status"] == "nonfinite"
    assert records[2]["activation"] is None and records[2]["validated"] is None
    assert records[3]["status"] == "stopped" and records[3]["stopped_seeds"] >= 1
    assert np.isfinite(records[3]["activation"]) and records[3]["validated"]
    assert document["validated"]
    assert "unit 2" in result.stderr and "unit 3" in result.stderr


def test_a_run_without_any_finite_activation_fails(tmp_path):
    model = overflowing(tmp_path / "model.onnx")
    result = maximize(model, "--node", "scale:2", *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stderr and "unit 2" in result.stderr
    assert document_of(tmp_path / "out")["validated"] is False


def test_zero_gradient_model_warns_instead_of_crashing(tmp_path):
    model = shared_model("gtsrb_binarized_sign_48x48.onnx")
    out = tmp_path / "out"
    result = maximize(model, "--node", "quant_conv2d_4/QuantConv2D:0", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert "gradient is exactly zero" in result.stderr
    record = document_of(out)["results"][0]
    assert record["validated"] and record["best_step"] == 0
    assert Image.open(out / "unit000_portfolio.png").size == (144, 144)


# ------------------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize("args, fragments", [
    (["--node", "conv9"], ["no such node", "Closest: conv3", "onnxproxy inspect"]),
    (["--node", "conv3:64"], ["out of range", "64 units"]),
    (["--steps", "0"], ["--steps must be positive"]),
    (["--lr", "0"], ["--lr must be positive"]),
    (["--lr", "-0.1"], ["--lr must be positive"]),
    (["--input-range", "1", "-1"], ["LO < HI"]),
    (["--input-range", "0", "0"], ["LO < HI"]),
])
def test_bad_options_are_usage_errors_and_write_nothing(tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_usage_error(maximize(*args, "--out", out), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_target_that_does_not_depend_on_the_input_is_refused(tmp_path):
    model = with_constant_branch(tmp_path / "model.onnx")
    assert_usage_error(maximize(model, "--node", "constant_sum", "--out", tmp_path / "out"), "'k'")
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_usage_error(maximize("--device", "cuda", "--out", tmp_path / "out"), "no CUDA device")


def test_existing_folder_is_kept_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert_usage_error(maximize(*FAST, "--out", out), "not empty", "--force")
    assert [path.name for path in out.iterdir()] == ["mine.txt"]
    assert maximize(*FAST, "--out", out, "--force").exit_code == 0
    assert "mine.txt" not in {path.name for path in out.iterdir()}


def test_a_run_failing_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def write_then_fail(folder, document, inputs, images, grid):
        (folder / "results.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_results", write_then_fail)
    out = tmp_path / "out"
    result = maximize(*FAST, "--out", out)
    assert isinstance(result.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging sibling

    out.mkdir()
    (out / "previous.txt").write_text("earlier run")
    maximize(*FAST, "--out", out, "--force")
    assert [path.name for path in out.iterdir()] == ["previous.txt"]


def test_a_torch_onnxruntime_mismatch_exits_1_after_writing_everything(tmp_path, monkeypatch):
    def corrupted_target(*args):
        target = prepare_target(*args)
        last_conv = [module for module in target.module.modules() if isinstance(module, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last_conv.bias += 0.5
        return target

    prepare_target = run.prepare_target
    monkeypatch.setattr(run, "prepare_target", corrupted_target)
    out = tmp_path / "out"
    result = maximize("--units", "0-1", *FAST, "--out", out)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stderr
    document = document_of(out)
    assert document["validated"] is False
    assert [record["validated"] for record in document["results"]] == [False, False]
    assert {"unit000_portfolio.png", "unit001_portfolio.png", "grid.png", "inputs.npz"} <= {
        path.name for path in out.iterdir()}


def test_a_batch_size_fixed_in_a_reshape_is_freed_so_units_and_seeds_run_as_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Reshape", ["relu", "flat"], ["flat_out"], name="flatten"),
             helper.make_node("Gemm", ["flat_out", "fc_w"], ["logits"], name="logits", transB=1)]
    model = onnx_model(nodes, [float_input("x", [1, 1, 4, 4])], [float_input("logits", [1, 3])],
                       {"w": rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "flat": np.array([1, -1]),
                        "fc_w": rng.normal(size=(3, 8)).astype(np.float32)})
    path = tmp_path / "fixed_batch.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    result = maximize(path, "--node", "logits:0-2", "--steps", "4", "--seeds", "2", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert document_of(out)["validated"]
    assert any("Reshape" in repair for repair in load_model(path).repairs)
