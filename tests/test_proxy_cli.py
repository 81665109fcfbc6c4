"""`onnxproxy proxy`: writes a valid proxy model, tells what it rewrote, and fails like a CLI, not a program."""

import onnx
import pytest
from click.testing import CliRunner

from cli import main
from conftest import GENERATED_COUNTS, shared_model, write_generated_model
from onnxproxy.proxy import count_dual_slope_nodes


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return write_generated_model("helper-opset13", tmp_path_factory.mktemp("models") / "zoo.onnx")


def _run(*arguments):
    return CliRunner().invoke(main, ["proxy", *map(str, arguments)])


def _printed_counts(stdout: str) -> dict:
    """{op type: count} from the lines `OpType  N rewritten`."""
    return {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines() if line.endswith(" rewritten")}


def test_writes_a_valid_proxy_model_and_prints_counts_per_op_type(generated, tmp_path):
    output = tmp_path / "proxy.onnx"
    result = _run(generated, "-o", output, "--backward-slope", "0.5")
    assert result.exit_code == 0, result.output
    written = onnx.load(str(output))
    onnx.checker.check_model(written, full_check=True)
    assert count_dual_slope_nodes(written) == sum(GENERATED_COUNTS.values())
    assert {node.name: attribute.f for node in written.graph.node for attribute in node.attribute
            if attribute.name == "backward_slope"} == dict.fromkeys(["relu", "leaky", "prelu", "relu6", "clip_min0"], 0.5)
    assert _printed_counts(result.stdout) == GENERATED_COUNTS
    assert [path.name for path in tmp_path.iterdir()] == ["proxy.onnx"]  # no temporary file left behind


def test_rectifiers_option_limits_the_rewrite(generated, tmp_path):
    output = tmp_path / "proxy.onnx"
    result = _run(generated, "-o", output, "--rectifiers", "prelu,Clip")
    assert result.exit_code == 0, result.output
    expected = {op_type: GENERATED_COUNTS[op_type] for op_type in ("PRelu", "Clip")}
    assert _printed_counts(result.stdout) == expected
    assert count_dual_slope_nodes(onnx.load(str(output))) == sum(expected.values())


def test_unknown_rectifier_kind_is_a_usage_error(generated, tmp_path):
    result = _run(generated, "-o", tmp_path / "proxy.onnx", "--rectifiers", "relu,sigmoid")
    assert result.exit_code == 2
    assert "sigmoid" in result.stderr
    assert not (tmp_path / "proxy.onnx").exists()


def test_non_finite_backward_slope_is_a_usage_error(generated, tmp_path):
    result = _run(generated, "-o", tmp_path / "proxy.onnx", "--backward-slope", "nan")
    assert result.exit_code == 2
    assert "--backward-slope" in result.stderr and "Traceback" not in result.output


def test_model_without_rectifier_gets_a_warning_and_exit_0(tmp_path):
    output = tmp_path / "proxy.onnx"
    result = _run(shared_model("mnist_mlp_sigmoid_6x200_eran.onnx"), "-o", output)
    assert result.exit_code == 0, result.output
    assert "Warning" in result.stderr and "ordinary gradient ascent" in result.stderr
    assert count_dual_slope_nodes(onnx.load(str(output))) == 0


def test_missing_model_is_a_usage_error_without_traceback(tmp_path):
    result = _run(tmp_path / "missing.onnx", "-o", tmp_path / "proxy.onnx")
    assert result.exit_code == 2
    assert "missing.onnx" in result.stderr
    assert "Traceback" not in result.output
