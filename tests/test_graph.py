"""Loading, repairing and converting models from every exporter there is: each must convert to torch and
match onnxruntime on the unchanged model (graph.convert_checked raises otherwise)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DEFAULT_MODEL, export_classic, float_input, onnx_model, shared_model, shared_model_names
from onnxproxy.errors import UserError
from onnxproxy.graph import convert_checked, load_model, logits_node, resolve_node, to_torch

pytestmark = pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
LIGHT_MODELS = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("light_*.onnx"))
RNG = np.random.default_rng(0)


def _save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def _weights(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _unshaped_tensors(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    shaped = {value.name for value in [*graph.value_info, *graph.output, *graph.input]
              if value.type.tensor_type.HasField("shape")}
    return [name for node in graph.node for name in node.output if name and name not in shaped]


def _same_auto_pads(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node for attribute in node.attribute
            if attribute.name == "auto_pad" and attribute.s.startswith(b"SAME")]


def _check_loaded(path, **options):
    """Load, convert and compare with onnxruntime; the repaired graph keeps the original tensor names and
    has a shape for every tensor onnx2torch sees."""
    loaded = load_model(path, **options)
    convert_checked(loaded)
    assert _unshaped_tensors(loaded.repaired) == []
    repaired_tensors = {name for node in loaded.repaired.graph.node for name in node.output}
    repaired_tensors |= {tensor.name for tensor in loaded.repaired.graph.initializer}
    for output in loaded.outputs:
        assert output.name in repaired_tensors | {value.name for value in loaded.repaired.graph.input}
    return loaded


# ---------------------------------------------------------------------------------------- real models


@pytest.mark.parametrize("name", shared_model_names())
def test_shared_model_converts_and_matches_onnxruntime(name):
    loaded = _check_loaded(shared_model(name))
    original_tensors = {name for node in loaded.original.graph.node for name in node.output}
    repaired_tensors = {name for node in loaded.repaired.graph.node for name in node.output}
    repaired_tensors |= {tensor.name for tensor in loaded.repaired.graph.initializer}
    assert original_tensors <= repaired_tensors  # validation finds every tensor under its original name


def test_unsorted_keras_model_is_sorted_and_padded_explicitly():
    loaded = _check_loaded(shared_model("mnist_cnn_keras2onnx_unsorted.onnx"))
    assert "sorted nodes topologically" in loaded.repairs
    assert any("auto_pad" in repair for repair in loaded.repairs)
    assert _same_auto_pads(loaded.original) and not _same_auto_pads(loaded.repaired)


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=[path.stem for path in LIGHT_MODELS])
def test_model_zoo_graph_from_the_onnx_wheel_converts_and_matches(path):
    _check_loaded(path)


# --------------------------------------------------------------------------------- torch's exporters


@pytest.fixture(scope="module")
def small_cnn():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU6(), nn.Linear(16, 4),
    )
    with torch.no_grad():  # a trained-looking BatchNorm, so that folding it wrong would show
        network[1].running_mean.uniform_(-1, 1)
        network[1].running_var.uniform_(0.5, 2)
    return network.eval()


def _torch_export(network, path, example, dynamo, **options):
    import torch

    if dynamo:
        batch = torch.export.Dim("batch")
        torch.onnx.export(network, (example,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: batch},), **options)
    else:
        export_classic(network, example, path, input_names=["x"], output_names=["logits"],
                       dynamic_axes={"x": {0: "batch"}}, **options)
    return path


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_torch_classic_export_converts(small_cnn, tmp_path, opset):
    import torch

    path = _torch_export(small_cnn, tmp_path / "cnn.onnx", torch.randn(2, 3, 12, 12), False, opset_version=opset)
    loaded = _check_loaded(path)
    assert loaded.input.shape[0] == "batch"  # the batch stays free
    assert sum(node.rectifier for node in loaded.nodes) == 3  # ReLU, LeakyReLU, ReLU6 as Clip(0, 6)


def test_torch_dynamo_export_converts(small_cnn, tmp_path):
    pytest.importorskip("onnxscript")
    import torch

    path = _torch_export(small_cnn, tmp_path / "cnn.onnx", torch.randn(2, 3, 12, 12), True)
    loaded = _check_loaded(path)
    assert any(repair.startswith("converted opset") for repair in loaded.repairs)
    assert sum(node.rectifier for node in loaded.nodes) == 3


def test_torch_dynamo_ops_the_version_converter_cannot_lower_are_handled(tmp_path):
    """Gelu (opset 20 only), Split-18 from torch.chunk and Pad-18+ have no down-adapter in onnx's converter."""
    pytest.importorskip("onnxscript")
    import torch
    import torch.nn.functional as F
    from torch import nn

    class DynamoOps(nn.Module):
        def forward(self, x):
            first, second = torch.chunk(F.pad(x, (1, 1)), 2, dim=1)
            return F.gelu(first) + F.gelu(second, approximate="tanh")

    path = _torch_export(DynamoOps().eval(), tmp_path / "ops.onnx", torch.randn(2, 4, 6), True)
    loaded = _check_loaded(path)
    assert {"Gelu", "Split", "Pad"} <= {node.op_type for node in loaded.nodes}
    assert any("Gelu" in repair for repair in loaded.repairs)


def test_channels_last_model_converts_and_is_seen_as_nhwc(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            features = torch.relu(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
            return self.fc(features.flatten(1))

    path = _torch_export(ChannelsLast().eval(), tmp_path / "nhwc.onnx", torch.randn(1, 8, 8, 3), False,
                         opset_version=13)
    loaded = _check_loaded(path)
    assert loaded.input.layout == "NHWC"


# ------------------------------------------------------------------------------ hand-built quirks


def _conv_relu_model(constant_weights: bool, named: bool = True) -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv(3x3) -> Relu -> Clip(min 0) -> GlobalAveragePool -> Flatten -> y[N,3]."""
    weight, bias, lower = _weights(3, 2, 3, 3), _weights(3), np.array(0.0, np.float32)
    constants = {"W": weight, "B": bias, "lower": lower}
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Clip", ["relu", "lower"], ["clip"]),
        helper.make_node("GlobalAveragePool", ["clip"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["y"]),
    ]
    if constant_weights:
        nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))
                 for name, array in constants.items()] + nodes
    for index, node in enumerate(nodes):
        node.name = f"layer{index}" if named else ""
    return onnx_model(nodes, [float_input("x", ["N", 2, 6, 6])], [float_input("y", None)],
                      None if constant_weights else constants)


def test_constant_node_weights_become_initializers(tmp_path):
    loaded = _check_loaded(_save(_conv_relu_model(constant_weights=True), tmp_path))
    assert any("Constant x3" in repair for repair in loaded.repairs)
    assert "Constant" not in {node.op_type for node in loaded.repaired.graph.node}
    assert [node.op_type for node in loaded.nodes if node.rectifier] == ["Relu", "Clip"]  # Clip's min was a Constant


def test_unnamed_nodes_get_stable_names_that_node_addressing_accepts(tmp_path):
    path = _save(_conv_relu_model(constant_weights=False, named=False), tmp_path)
    names = [node.name for node in load_model(path).nodes]
    assert names == ["Conv_0", "Relu_1", "Clip_2", "GlobalAveragePool_3", "Flatten_4"]
    loaded_again = load_model(path)
    assert [node.name for node in loaded_again.nodes] == names
    assert resolve_node(loaded_again, "Relu_1").output == "relu"
    convert_checked(loaded_again)


def test_unsorted_graph_is_sorted_and_inventoried_in_graph_order(tmp_path):
    model = _conv_relu_model(constant_weights=False)
    reversed_nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(reversed_nodes)
    loaded = _check_loaded(_save(model, tmp_path))
    assert "sorted nodes topologically" in loaded.repairs
    assert [node.op_type for node in loaded.nodes] == ["Conv", "Relu", "Clip", "GlobalAveragePool", "Flatten"]


def test_same_auto_pads_and_asymmetric_average_pools_are_made_explicit(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv"], "conv", kernel_shape=[2, 2], auto_pad="SAME_LOWER"),
        helper.make_node("MaxPool", ["conv"], ["max"], "max", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("AveragePool", ["max"], ["y"], "avg", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),  # on 4x4: pads 0 before, 1 after, not counted in the mean
    ]
    model = onnx_model(nodes, [float_input("x", ["N", 2, 7, 7])], [float_input("y", None)], {"W": _weights(4, 2, 2, 2)})
    loaded = _check_loaded(_save(model, tmp_path))
    assert not _same_auto_pads(loaded.repaired)
    assert "Pad" in {node.op_type for node in loaded.repaired.graph.node}
    assert loaded.node_by_output("y").shape == ["N", 4, 2, 2]


def test_identity_of_initializer_and_noop_allowzero_are_repaired(tmp_path):
    nodes = [
        helper.make_node("Identity", ["W"], ["W_copy"], "copy"),
        helper.make_node("MatMul", ["x", "W_copy"], ["product"], "matmul"),
        helper.make_node("Reshape", ["product", "shape"], ["y"], "reshape", allowzero=1),
    ]
    initializers = {"W": _weights(6, 4), "shape": np.array([-1, 2, 2], np.int64)}
    model = onnx_model(nodes, [float_input("x", ["N", 6])], [float_input("y", None)], initializers, opset=14)
    loaded = _check_loaded(_save(model, tmp_path))
    assert any("Identity x1" in repair for repair in loaded.repairs)
    assert any("allowzero" in repair for repair in loaded.repairs)
    assert loaded.node_by_output("y").shape[1:] == [2, 2]


def test_unsupported_ops_are_listed_together(tmp_path):
    nodes = [helper.make_node("Hardmax", ["x"], ["h1"], "hard1"), helper.make_node("Hardmax", ["h1"], ["h2"], "hard2"),
             helper.make_node("Shrink", ["h2"], ["y"], "shrink")]
    model = onnx_model(nodes, [float_input("x", ["N", 5])], [float_input("y", None)])
    loaded = load_model(_save(model, tmp_path))
    with pytest.raises(UserError) as error:
        to_torch(loaded.repaired)
    message = str(error.value)
    assert "Hardmax x2 (hard1, hard2)" in message and "Shrink x1 (shrink)" in message and "opset 13" in message


# ----------------------------------------------------------------------------- ai.onnx.ml tails


def _ml_tailed_classifier() -> onnx.ModelProto:
    """A linear softmax classifier that ends like skl2onnx's: label via ArgMax + ArrayFeatureExtractor,
    probabilities via ZipMap."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["scores"], "linear"),
        helper.make_node("Softmax", ["scores"], ["probabilities"], "softmax", axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["index"], "argmax", axis=1, keepdims=0),
        helper.make_node("ArrayFeatureExtractor", ["classes", "index"], ["label"], "label", domain="ai.onnx.ml"),
        helper.make_node("ZipMap", ["probabilities"], ["output_probability"], "zipmap", domain="ai.onnx.ml",
                         classlabels_int64s=[10, 20, 30]),
    ]
    graph = helper.make_graph(
        nodes, "classifier", [float_input("x", ["N", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_value_info("output_probability", helper.make_sequence_type_proto(
             helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))],
        [numpy_helper.from_array(_weights(4, 3), "W"),
         numpy_helper.from_array(np.array([10, 20, 30], np.int64), "classes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])


def test_ml_tail_is_cut_at_the_probabilities(tmp_path):
    loaded = _check_loaded(_save(_ml_tailed_classifier(), tmp_path))
    assert [output.name for output in loaded.outputs] == ["probabilities"]
    assert any("ai.onnx.ml" in repair and "probabilities" in repair for repair in loaded.repairs)
    assert {node.domain for node in loaded.repaired.graph.node} == {""}


def test_skl2onnx_mlp_classifier_converts_up_to_its_probabilities(tmp_path):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier

    x = RNG.standard_normal((60, 5)).astype(np.float32)
    classifier = MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0).fit(x, x[:, 0] > 0)
    loaded = _check_loaded(_save(skl2onnx.to_onnx(classifier, x[:1]), tmp_path))
    assert [node.op_type for node in loaded.nodes if node.rectifier] == ["Relu"]
    assert any("ai.onnx.ml" in repair for repair in loaded.repairs)


def test_classifier_made_only_of_ml_ops_is_refused_clearly(tmp_path):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LogisticRegression

    x = RNG.standard_normal((60, 5)).astype(np.float32)
    classifier = LogisticRegression().fit(x, x[:, 0] > 0)
    with pytest.raises(UserError, match="LinearClassifier"):
        load_model(_save(skl2onnx.to_onnx(classifier, x[:1]), tmp_path))


# ------------------------------------------------------------------------------------ node addressing


@pytest.fixture
def addressable(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["features.conv1.out"], "features/conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["features.conv1.out"], ["act1"], "features/relu1"),
        helper.make_node("Conv", ["act1", "W2"], ["features.conv2.out"], "features/conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["features.conv2.out"], ["half_a", "half_b"], "splitter", axis=1, num_outputs=2),
        helper.make_node("Add", ["half_a", "half_b"], ["logits"], "classifier/Head"),
    ]
    model = onnx_model(nodes, [float_input("x", ["N", 1, 4, 4])], [float_input("logits", None)],
                       {"W1": _weights(2, 1, 3, 3), "W2": _weights(4, 2, 3, 3)}, opset=18)
    return load_model(_save(model, tmp_path))


def test_node_is_found_by_name_output_tensor_suffix_and_substring(addressable):
    assert resolve_node(addressable, "features/relu1").output == "act1"  # exact node name
    assert resolve_node(addressable, "act1").name == "features/relu1"  # output tensor name
    assert resolve_node(addressable, "half_b").name == "splitter"  # a second output
    assert resolve_node(addressable, "head").name == "classifier/Head"  # case-insensitive suffix
    assert resolve_node(addressable, "conv2").name == "features/conv2"  # suffix beats substring
    assert resolve_node(addressable, "ClassiFier").name == "classifier/Head"  # substring


def test_ambiguous_node_lists_the_candidates(addressable):
    with pytest.raises(UserError) as error:
        resolve_node(addressable, "features/")
    message = str(error.value)
    assert "ambiguous" in message and "features/conv1" in message and "features/conv2" in message
    assert "onnxproxy inspect" in message and error.value.exit_code == 2


def test_unknown_node_suggests_close_names(addressable):
    with pytest.raises(UserError) as error:
        resolve_node(addressable, "features/conv3")
    message = str(error.value)
    assert "Closest" in message and "features/conv2" in message and "onnxproxy inspect" in message


def test_messages_name_the_option_and_list_each_close_name_once():
    model = load_model(DEFAULT_MODEL)  # its nodes are named like their output tensors
    with pytest.raises(UserError) as error:
        resolve_node(model, "conv9", "--tol")
    message = str(error.value)
    assert message.startswith("--tol conv9: no such node")
    closest = message.split("Closest: ")[1].split(".")[0].split(", ")
    assert "conv3" in closest and len(closest) == len(set(closest))


# ------------------------------------------------------------------------------------------------ logits


def test_logits_are_the_output_or_what_a_final_softmax_reads(addressable, tmp_path):
    assert logits_node(addressable).name == "classifier/Head"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["scores"], "linear"),
             helper.make_node("Softmax", ["scores"], ["probabilities"], "softmax", axis=1)]
    model = onnx_model(nodes, [float_input("x", ["N", 4])], [float_input("probabilities", None)], {"W": _weights(4, 3)})
    assert logits_node(load_model(_save(model, tmp_path, "softmax.onnx"))).name == "linear"
