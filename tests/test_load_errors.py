"""Bad models and options: each gives one clear line and exit status 2 through the CLI, never a traceback."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from cli import main
from conftest import float_input, onnx_model


def _conv_model(input_shape=("N", 3, 8, 8)) -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((16, input_shape[1], 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"], "conv"), helper.make_node("Relu", ["conv"], ["y"], "relu")]
    return onnx_model(nodes, [float_input("x", list(input_shape))], [float_input("y", None)], {"W": weight})


def _inspect(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_file(tmp_path):
    _assert_one_line_error(_inspect(tmp_path / "absent.onnx"), "absent.onnx", "no such file")


def test_directory(tmp_path):
    _assert_one_line_error(_inspect(tmp_path), "directory")


def test_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are notes, not a network\n" * 20)
    _assert_one_line_error(_inspect(path), "notes.onnx", "ONNX model")


def test_truncated_onnx_file(tmp_path):
    data = _conv_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(_inspect(path), "truncated.onnx")


def _save_with_external_data(folder):
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(_conv_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def test_external_data_file_missing(tmp_path):
    path = _save_with_external_data(tmp_path / "model")
    assert _inspect(path).exit_code == 0  # with its data file the model loads
    (path.parent / "weights.bin").unlink()
    _assert_one_line_error(_inspect(path), "weights.bin", "missing")


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    path = _save_with_external_data(tmp_path / "model")
    (path.parent / "weights.bin").rename(tmp_path / "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    path.write_bytes(model.SerializeToString())
    _assert_one_line_error(_inspect(path), "../weights.bin", "outside")


def test_model_without_float_input(tmp_path):
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    model = onnx_model([helper.make_node("Gather", ["table", "ids"], ["y"], "lookup")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])], [float_input("y", None)],
                       {"table": table})
    path = tmp_path / "lookup.onnx"
    onnx.save(model, str(path))
    _assert_one_line_error(_inspect(path), "no float input", "ids")


def test_free_spatial_dimension_needs_input_shape(tmp_path):
    path = tmp_path / "fully_convolutional.onnx"
    onnx.save(_conv_model(("N", 3, "height", "width")), str(path))
    _assert_one_line_error(_inspect(path), "height", "--input-shape")
    result = _inspect(path, "--input-shape", "x:1,3,10,12", "--json")
    assert result.exit_code == 0, result.output
    assert '"shape": [\n        "N",\n        16,\n        8,\n        10\n      ]' in result.output  # 10x12 - 3 + 1


@pytest.mark.parametrize("spec", ["x:1,3,a,b", ":1,3,8,8", "x:1,3,8", "nosuch:1,3,8,8"])
def test_bad_input_shape_option(tmp_path, spec):
    path = tmp_path / "model.onnx"
    onnx.save(_conv_model(), str(path))
    _assert_one_line_error(_inspect(path, "--input-shape", spec), "--input-shape")


def test_several_inputs_need_input_option(tmp_path):
    model = onnx_model([helper.make_node("Add", ["left", "right"], ["y"], "add")],
                       [float_input(name, ["N", 4]) for name in ("left", "right")], [float_input("y", None)])
    path = tmp_path / "two_inputs.onnx"
    onnx.save(model, str(path))
    _assert_one_line_error(_inspect(path), "several inputs", "left", "right", "--input")
    _assert_one_line_error(_inspect(path, "--input", "middle"), "middle", "no such input")
    assert _inspect(path, "--input", "right").exit_code == 0
