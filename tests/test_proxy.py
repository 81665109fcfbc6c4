"""The proxy graph: the rewrite keeps every forward value and changes only the backward of rectifiers."""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import helper
from torch import nn

from conftest import (EXPORTED_COUNTS, GENERATED, GENERATED_COUNTS, float_input, helper_model, onnx_model,
                      shared_model, shared_model_names, write_generated_model)
from onnxproxy.errors import UserError
from onnxproxy.graph import load_model, to_torch
from onnxproxy.proxy import (DualSlope, DualSlopeFunction, build_proxy, count_dual_slope_nodes, dual_slope_modules,
                             set_backward_slope)


# ------------------------------------------------------------------------------------------- fixtures


@dataclass
class Case:
    loaded: object  # graph.LoadedModel
    proxy: onnx.ModelProto
    rewritten: Counter
    expected: Counter  # rectifiers by op type that must be rewritten
    plain_module: nn.Module  # onnx2torch conversion of the unchanged repaired model: ordinary autograd
    proxy_module: nn.Module

    def random_input(self, seed=0) -> np.ndarray:
        shape = [size if isinstance(size, int) else 1 for size in self.loaded.input.shape]
        return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def _expected_counts(kind: str, loaded) -> Counter:
    if kind in GENERATED:
        return EXPORTED_COUNTS if kind.startswith("torch") else GENERATED_COUNTS
    return Counter(node.op_type for node in loaded.nodes if node.rectifier)


@pytest.fixture(scope="module", params=GENERATED + shared_model_names())
def case(request, tmp_path_factory) -> Case:
    kind = request.param
    if kind in GENERATED:
        path = write_generated_model(kind, tmp_path_factory.mktemp("generated") / f"{kind}.onnx")
    else:
        path = shared_model(kind)
    try:
        loaded = load_model(path)
        plain_module = to_torch(loaded.repaired)
    except UserError as error:
        pytest.skip(f"{kind} does not convert yet: {error}")
    proxy, rewritten = build_proxy(loaded.repaired)
    return Case(loaded, proxy, rewritten, _expected_counts(kind, loaded), plain_module, to_torch(proxy))


def _run_onnxruntime(model: onnx.ModelProto, name: str, array: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: array})


def _outputs(module: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    outputs = module(tensor)
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _input_gradient(module: nn.Module, array: np.ndarray) -> torch.Tensor:
    """Gradient of a fixed weighted sum of all outputs, so that no output's gradient can cancel out."""
    tensor = torch.from_numpy(array).requires_grad_(True)
    objective = sum((output.flatten() * torch.linspace(-1, 1, output.numel())).sum()
                    for output in _outputs(module, tensor))
    (gradient,) = torch.autograd.grad(objective, tensor)
    return gradient


# ------------------------------------------------------------------------------------------- the rewrite


def test_proxy_is_valid_onnx_with_one_dual_slope_node_per_rectifier(case):
    onnx.checker.check_model(case.proxy, full_check=True)
    assert case.proxy.ir_version >= 8 or not case.rewritten  # model-local functions need IR 8; the checker lets it be
    assert case.rewritten == case.expected
    assert count_dual_slope_nodes(case.proxy) == sum(case.expected.values())
    assert not [node.name for node in case.proxy.graph.node if node.op_type in ("Relu", "LeakyRelu", "PRelu")]


def test_proxy_outputs_equal_the_original_in_onnxruntime(case):
    array = case.random_input()
    name = case.loaded.input.name
    expected = _run_onnxruntime(case.loaded.original, name, array)
    actual = _run_onnxruntime(case.proxy, name, array)
    assert len(actual) == len(expected)
    for proxy_output, original_output in zip(actual, expected):
        np.testing.assert_allclose(proxy_output, original_output, rtol=1e-5, atol=1e-6)


def test_proxy_outputs_equal_the_original_bitwise_in_torch(case):
    tensor = torch.from_numpy(case.random_input())
    with torch.no_grad():
        for proxy_output, plain_output in zip(_outputs(case.proxy_module, tensor), _outputs(case.plain_module, tensor)):
            assert torch.equal(proxy_output, plain_output)


def test_backward_slope_none_gives_ordinary_gradients(case):
    set_backward_slope(case.proxy_module, None)
    array = case.random_input(seed=1)
    assert torch.equal(_input_gradient(case.proxy_module, array), _input_gradient(case.plain_module, array))


def test_clip_that_is_no_rectifier_is_kept(tmp_path):
    loaded = load_model(write_generated_model("helper-opset13", tmp_path / "zoo.onnx"))
    proxy, _ = build_proxy(loaded.repaired)
    assert [node.name for node in proxy.graph.node if node.op_type == "Clip"] == ["clip_symmetric"]


def test_rectifiers_with_computed_slopes_or_bounds_are_neither_counted_nor_rewritten(tmp_path):
    nodes = [helper.make_node("Abs", ["x"], ["slope"], "abs"),
             helper.make_node("PRelu", ["x", "slope"], ["p"], "prelu_computed_slope"),
             helper.make_node("Clip", ["p", "zero", "slope"], ["y"], "clip_computed_max")]
    model = onnx_model(nodes, [float_input("x", ["N", 4])], [float_input("y", None)],
                       {"zero": np.array(0.0, np.float32)})
    onnx.save(model, str(tmp_path / "computed.onnx"))
    loaded = load_model(tmp_path / "computed.onnx")
    assert not [node.name for node in loaded.nodes if node.rectifier]
    assert build_proxy(loaded.repaired)[1] == Counter()


@pytest.mark.parametrize("kinds", [("relu",), ("leakyrelu", "prelu"), ("clip",), ()])
def test_rectifiers_selects_kinds(tmp_path, kinds):
    loaded = load_model(write_generated_model("helper-opset13", tmp_path / "zoo.onnx"))
    proxy, rewritten = build_proxy(loaded.repaired, rectifiers=kinds)
    expected = Counter({op: count for op, count in GENERATED_COUNTS.items() if op.lower() in kinds})
    assert rewritten == expected
    assert count_dual_slope_nodes(proxy) == sum(expected.values())
    onnx.checker.check_model(proxy, full_check=True)


def test_unknown_rectifier_kind_is_refused():
    with pytest.raises(ValueError, match="sigmoid"):
        build_proxy(helper_model(13), rectifiers=("relu", "sigmoid"))


def test_backward_slope_is_set_per_layer_by_node_name(tmp_path):
    loaded = load_model(write_generated_model("helper-opset13", tmp_path / "zoo.onnx"))
    module = to_torch(build_proxy(loaded.repaired, backward_slope=0.3)[0])
    assert set_backward_slope(module, {"leaky": 0.9, "relu6": None}) == 2
    slopes = {op.node_name: op.backward_slope for op in dual_slope_modules(module)}
    assert slopes == {"relu": pytest.approx(0.3), "leaky": 0.9, "prelu": pytest.approx(0.3), "relu6": None,
                      "clip_min0": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="nonexistent"):
        set_backward_slope(module, {"nonexistent": 0.5})


# ------------------------------------------------------------------------------------- the op's backward

# Input x, then the local slope dy/dx expected with backward slope 0.3: 1 where x > 0, 0.3 where x <= 0
# (x = 0 takes the negative side, as torch's relu does), 0 from a Clip's upper bound on.
ANALYTIC = {
    "Relu": (dict(forward_slope=0.0), [-2.0, -0.5, 0.0, 0.5, 2.0], [0.3, 0.3, 0.3, 1.0, 1.0]),
    "LeakyRelu": (dict(forward_slope=0.1), [-2.0, -0.5, 0.0, 0.5, 2.0], [0.3, 0.3, 0.3, 1.0, 1.0]),
    "Clip": (dict(forward_slope=0.0, upper=6.0), [-2.0, 0.0, 0.5, 5.0, 6.0, 7.0], [0.3, 0.3, 1.0, 1.0, 0.0, 0.0]),
}
ORDINARY = {"Relu": nn.ReLU(), "LeakyRelu": nn.LeakyReLU(0.1), "Clip": nn.ReLU6()}


def _forward_and_gradient(module, x, upstream):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (gradient,) = torch.autograd.grad(y, x, upstream)
    return y.detach(), gradient


@pytest.mark.parametrize("op_type", ANALYTIC)
def test_gradient_is_one_on_the_positive_side_and_the_backward_slope_on_the_negative(op_type):
    arguments, values, local_slope = ANALYTIC[op_type]
    x = torch.tensor(values)
    upstream = torch.arange(1.0, len(values) + 1)
    y, gradient = _forward_and_gradient(DualSlope("node", op_type, backward_slope=0.3, **arguments), x, upstream)
    assert torch.equal(y, ORDINARY[op_type](x))
    torch.testing.assert_close(gradient, upstream * torch.tensor(local_slope))


@pytest.mark.parametrize("op_type", ANALYTIC)
def test_backward_slope_none_is_ordinary_autograd_even_at_the_kinks(op_type):
    arguments, values, _ = ANALYTIC[op_type]
    x = torch.tensor(values)
    upstream = torch.arange(1.0, len(values) + 1)
    _, gradient = _forward_and_gradient(DualSlope("node", op_type, backward_slope=None, **arguments), x, upstream)
    assert torch.equal(gradient, _forward_and_gradient(ORDINARY[op_type], x, upstream)[1])


def test_prelu_keeps_its_per_channel_forward_slopes_and_takes_one_backward_slope():
    slope = torch.tensor([0.1, 0.2]).reshape(2, 1, 1)
    x = torch.tensor([[-1.0, 0.5, -2.0], [-3.0, 1.0, -0.5]]).reshape(1, 2, 1, 3)
    upstream = torch.ones_like(x)
    proxy = DualSlope("node", "PRelu", slope, backward_slope=0.3)
    y, gradient = _forward_and_gradient(proxy, x, upstream)
    assert torch.equal(y, nn.functional.prelu(x, slope.flatten()))
    torch.testing.assert_close(gradient, torch.tensor([[0.3, 1.0, 0.3], [0.3, 1.0, 0.3]]).reshape(x.shape))
    proxy.backward_slope = None
    _, gradient = _forward_and_gradient(proxy, x, upstream)
    torch.testing.assert_close(gradient, torch.tensor([[0.1, 1.0, 0.1], [0.2, 1.0, 0.2]]).reshape(x.shape))


GRADCHECK = {  # forward slope, upper bound; inputs lie away from the kinks, where finite differences are exact
    "Relu": (0.0, None),
    "LeakyRelu": (0.1, None),
    "PRelu": (torch.tensor([0.1, 0.2], dtype=torch.float64).reshape(2, 1, 1).requires_grad_(True), None),
    "Clip": (0.0, 6.0),
}


@pytest.mark.parametrize("op_type", GRADCHECK)
def test_gradcheck_passes_only_where_the_backward_slope_is_the_forward_slope(op_type):
    # gradcheck compares the backward with finite differences of the forward, i.e. with the true derivative.
    # Only b = forward slope (None) makes the backward that derivative; any other b is deliberately not, so
    # gradcheck must fail there: that failure is ProxyGrad's whole point, not a bug.
    forward_slope, upper = GRADCHECK[op_type]
    x = torch.tensor([-2.5, -1.2, -0.3, 0.4, 1.7, 3.3, 5.2, 7.5], dtype=torch.float64).reshape(1, 2, 1, 4)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(DualSlopeFunction.apply, (x, forward_slope, None, upper))
    assert not torch.autograd.gradcheck(DualSlopeFunction.apply, (x, forward_slope, 0.3, upper),
                                        raise_exception=False)


# ------------------------------------------------------------------------------- ProxyGrad's reason to be


def test_dead_first_layer_has_zero_ordinary_gradient_but_a_proxy_gradient():
    loaded = load_model(shared_model("mnist_mlp_256x2_unnamed.onnx"))
    proxy_module = to_torch(build_proxy(loaded.repaired, backward_slope=0.3)[0])
    plain_module = to_torch(loaded.repaired)
    torch.manual_seed(0)
    image = torch.rand(loaded.input.shape).numpy()  # [1, 784, 1], pixel-like values in [0, 1)
    assert torch.count_nonzero(_input_gradient(plain_module, image)) == 0
    assert torch.count_nonzero(_input_gradient(proxy_module, image)) > 0
