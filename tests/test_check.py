"""`onnxproxy check`: passes on real and generated models, and fails (exit 1) when it should."""

import json
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper
from torch import nn

from cli import main
from onnxproxy import check
from onnxproxy.graph import to_torch
from conftest import DEFAULT_MODEL, export_classic, float_input, onnx_model, shared_model, shared_model_names

SUMMARY = re.compile(r"^(PASSED|FAILED) \| (\d+) checks: (\d+) passed, (\d+) failed$", re.MULTILINE)
MISMATCHED = re.compile(r"^FAILED \| mismatched tensors in graph order \(the first is the likely root cause\): (.*)$",
                        re.MULTILINE)
# Binarized network: Sign has a zero derivative, so no gradient reaches the input; `check` must say so.
ZERO_GRADIENT_MODELS = {"gtsrb_binarized_sign_48x48.onnx"}


def run_check(*arguments):
    return CliRunner().invoke(main, ["check", *map(str, arguments)])


def failed_checks(output: str) -> list[str]:
    return re.findall(r"^\s*FAILED \| ([^|]+?) \|", output, re.MULTILINE)


class SmallNet(nn.Module):
    """Every rectifier kind (Relu, LeakyRelu, PRelu, Clip as ReLU6) among conv, BatchNorm, pooling, dense layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.prelu = nn.PReLU(16)
        self.fc1 = nn.Linear(16 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        x = nn.functional.avg_pool2d(self.prelu(self.conv2(x)), 2)
        x = nn.functional.leaky_relu(self.fc1(torch.flatten(x, 1)), 0.1)
        return self.fc2(nn.functional.relu6(x))


def export_small_net(path, opset, dynamic_batch=True):
    torch.manual_seed(opset)
    net = SmallNet()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    dynamic_axes = {"image": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
    return export_classic(net.eval(), torch.zeros(1, 3, 16, 16), path, opset_version=opset,
                          input_names=["image"], output_names=["logits"], dynamic_axes=dynamic_axes)


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    return export_small_net(tmp_path_factory.mktemp("nets") / "small_13.onnx", 13)


# ---------------------------------------------------------------------------------------------- passing


@pytest.mark.parametrize("name", shared_model_names())
def test_passes_on_shared_model(name):
    result = run_check(shared_model(name), "--batch", 2)
    if name in ZERO_GRADIENT_MODELS:
        assert result.exit_code == 1 and failed_checks(result.output) == ["gradient flow"], result.output
    else:
        assert result.exit_code == 0, result.output


def test_passes_on_embedded_model_and_writes_json(tmp_path):
    result = run_check(DEFAULT_MODEL, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["passed"] and document["counts"]["failed"] == 0
    assert [c["tensor"] for c in document["checks"] if "tensor" in c][:2] == ["conv1", "relu1"]
    assert document["inputs"]["shape"] == [4, 1, 32, 32]


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_passes_on_generated_model(tmp_path, opset):
    result = run_check(export_small_net(tmp_path / f"small_{opset}.onnx", opset))
    assert result.exit_code == 0, result.output
    assert "PASSED | rectifiers rewritten | 4 of 4 (Clip x1, LeakyRelu x1, PRelu x1, Relu x1)" in result.output


def test_fixed_batch_runs_loaded_rows_one_at_a_time(tmp_path):
    model = export_small_net(tmp_path / "batch1.onnx", 13, dynamic_batch=False)
    inputs = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", image=inputs)
    result = run_check(model, "--load-inputs", tmp_path / "inputs.npz", "--outputs", "final",
                       "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["inputs"]["shape"] == [3, 3, 16, 16]
    assert [c["tensor"] for c in document["checks"] if "tensor" in c] == ["logits"]


def test_selects_rectifier_outputs(small_net):
    result = run_check(small_net, "--outputs", "rectifiers")
    assert result.exit_code == 0, result.output
    assert result.output.count("Tensor '") == 4


# ---------------------------------------------------------------------------------------------- failing


def test_impossible_tolerance_names_first_mismatched_tensor(small_net, tmp_path):
    result = run_check(small_net, "--atol", 0, "--rtol", 0, "--junit", tmp_path / "junit.xml")
    assert result.exit_code == 1
    mismatched = MISMATCHED.search(result.output).group(1).split(", ")
    failed_tensors = [name.removeprefix("tensor ") for name in failed_checks(result.output)
                      if name.startswith("tensor ")]
    assert mismatched == failed_tensors == in_graph_order(small_net, mismatched)
    assert_junit_counts_match(result.output, tmp_path / "junit.xml")

    first = mismatched[0]
    relaxed = run_check(small_net, "--atol", 0, "--rtol", 0, "--tol", f"{first}:1")
    assert first not in (MISMATCHED.search(relaxed.output) or [""])[0].split(", ")


def in_graph_order(model_path, tensors):
    order = [name for node in onnx.load(model_path).graph.node for name in node.output]
    return sorted(tensors, key=order.index)


def assert_junit_counts_match(output, junit_path):
    _, total, passed, failed = SUMMARY.search(output).groups()
    suite = ElementTree.parse(junit_path).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert (suite.get("tests"), suite.get("failures")) == (total, failed)
    assert len(cases) == int(total) and sum(case.find("failure") is not None for case in cases) == int(failed)
    assert int(passed) + int(failed) == int(total)


def test_corrupted_weight_fails_at_its_layer(small_net, tmp_path, monkeypatch):
    def corrupting_to_torch(model):
        module = to_torch(model)
        with torch.no_grad():
            next(module.parameters()).view(-1)[0] += 1.0  # the first conv's weight
        return module

    monkeypatch.setattr(check, "to_torch", corrupting_to_torch)
    result = run_check(small_net, "--junit", tmp_path / "junit.xml", "--json", tmp_path / "report.json")
    assert result.exit_code == 1
    first_conv = next(node.output[0] for node in onnx.load(small_net).graph.node if node.op_type == "Conv")
    assert MISMATCHED.search(result.output).group(1).split(", ")[0] == first_conv
    assert_junit_counts_match(result.output, tmp_path / "junit.xml")
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["mismatched"][0] == first_conv and document["counts"]["failed"] >= 1


def test_unconvertible_op_fails_naming_its_node(tmp_path):
    path = tmp_path / "shrink.onnx"
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="rectify"),
             helper.make_node("Shrink", ["r"], ["s"], name="odd_shrink", lambd=0.5),  # onnx2torch has no Shrink
             helper.make_node("Relu", ["s"], ["y"], name="rectify_again")]
    onnx.save(onnx_model(nodes, [float_input("x", ["N", 4])], [float_input("y", ["N", 4])]), path)
    result = run_check(path)
    assert result.exit_code == 1
    assert failed_checks(result.output) == ["convert"]
    assert "odd_shrink" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("FAILED |")


def test_unloadable_model_is_a_failed_check(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    result = run_check(path)
    assert result.exit_code == 1 and failed_checks(result.output) == ["load"]


@pytest.mark.parametrize("arguments", [["--outputs", "no_such_tensor"], ["--val-range", 1, 0], ["--tol", "conv1:x"]])
def test_usage_errors_exit_2(arguments):
    result = run_check(DEFAULT_MODEL, *arguments)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------- comparison


def test_difference_statistics_treat_equal_non_finite_values_as_equal():
    reference = np.array([1.0, 0.0, np.inf, np.nan, 2.0], np.float32)
    actual = np.array([1.0, 1e-7, np.inf, np.nan, 2.5], np.float32)
    difference, passed = check.within_tolerance(actual, reference, atol=1e-6, rtol=0.0)
    assert not passed and difference.max_abs == 0.5 and difference.max_abs_at == [4]
    assert difference.max_rel == np.inf and difference.max_rel_at == [1]
    assert difference.record()["max_rel_diff"] is None  # strict JSON has no inf
    assert check.within_tolerance(actual[[0, 2, 3]], reference[[0, 2, 3]], atol=0.0, rtol=0.0)[1]
