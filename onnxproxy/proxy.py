"""The dual-slope op at the heart of ProxyGrad.

Forward: exactly the original rectifier (Relu, LeakyRelu, PRelu, or Clip with min 0), so the proxy graph's
forward values ARE the original network's. Backward: slope 1 where the input is positive and the backward
slope b where it is not (0 above a Clip's upper bound). b equal to the forward slope is the ordinary gradient.

Here live the ONNX rewrite (one custom node per rectifier, with an ONNX function body equal to its forward so
onnxruntime and Netron run and show the proxy model), the torch autograd function, and its onnx2torch converter.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import nn

from onnxproxy import protos
from onnxproxy.errors import UserError
from onnxproxy.graph import RECTIFIER_OPS, is_rectifier
from onnxproxy.settings import DEFAULT_BACKWARD_SLOPE

DOMAIN = "onnxproxy"  # onnx2torch puts the domain into torch module names, which refuse dots
DOMAIN_VERSION = 1
RECTIFIER_KINDS = tuple(op_type.lower() for op_type in RECTIFIER_OPS)  # relu, leakyrelu, prelu, clip
_OP_TYPE = {op_type: f"DualSlope{op_type}" for op_type in RECTIFIER_OPS}


# -------------------------------------------------------------------------------------------- ONNX side


def _function(op_type: str, original: str, inputs: list[str], attributes: list[str], opset: int):
    body_attributes = {}
    if "alpha" in attributes:
        body_attributes["alpha"] = helper.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT)
    body = helper.make_node(original, inputs, ["Y"])
    body.attribute.extend(body_attributes.values())
    return helper.make_function(DOMAIN, op_type, inputs, ["Y"], [body],
                                [helper.make_opsetid("", opset)], attributes + ["backward_slope"])


def _functions(opset: int) -> list:
    return [
        _function("DualSlopeRelu", "Relu", ["X"], [], opset),
        _function("DualSlopeLeakyRelu", "LeakyRelu", ["X"], ["alpha"], opset),
        _function("DualSlopePRelu", "PRelu", ["X", "slope"], [], opset),
        _function("DualSlopeClip", "Clip", ["X", "min", "max"], [], opset),
    ]


def check_rectifier_kinds(kinds) -> tuple[str, ...]:
    """The kinds as a tuple, or ValueError naming the unknown ones."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(RECTIFIER_KINDS))
    if unknown:
        raise ValueError(f"unknown rectifier kinds {', '.join(unknown)}; choose from {', '.join(RECTIFIER_KINDS)}")
    return kinds


def _clip_max_name(node) -> str:
    return node.input[2] if len(node.input) > 2 else ""


def build_proxy(model: onnx.ModelProto, backward_slope: float = DEFAULT_BACKWARD_SLOPE,
                rectifiers=RECTIFIER_KINDS) -> tuple[onnx.ModelProto, Counter]:
    """A copy of a repaired model (opset >= 11) with every selected rectifier replaced by a dual-slope node.

    Returns the proxy model and how many nodes of each original op type were rewritten.
    """
    rectifiers = check_rectifier_kinds(rectifiers)
    if not math.isfinite(backward_slope):
        raise UserError(f"--backward-slope must be finite, got {backward_slope}")
    if protos.default_opset(model) < 11:  # Clip's bounds are attributes before opset 11; repair the model first
        raise ValueError(f"build_proxy needs opset >= 11, got {protos.default_opset(model)}")
    proxy = protos.copy(model)
    initializers = {tensor.name: tensor for tensor in proxy.graph.initializer}
    rewritten = Counter()
    for node in proxy.graph.node:
        if is_rectifier(node, initializers) and node.op_type.lower() in rectifiers:
            rewritten[node.op_type] += 1
            _rewrite(node, backward_slope, proxy, initializers)
    if rewritten and DOMAIN not in {entry.domain for entry in proxy.opset_import}:
        proxy.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        proxy.functions.extend(_functions(protos.default_opset(proxy)))
        proxy.ir_version = max(proxy.ir_version, 8)  # model-local functions exist from IR version 8 on
    return proxy, rewritten


def _rewrite(node, backward_slope: float, proxy: onnx.ModelProto, initializers: dict) -> None:
    kept = [attribute for attribute in node.attribute if attribute.name == "alpha"]
    if node.op_type == "LeakyRelu" and not kept:
        kept = [helper.make_attribute("alpha", 0.01)]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute("backward_slope", float(backward_slope))])
    if node.op_type == "Clip" and not _clip_max_name(node):
        del node.input[2:]
        node.input.append(_infinite_upper_bound(proxy, node, initializers))
    node.op_type = _OP_TYPE[node.op_type]
    node.domain = DOMAIN


def _infinite_upper_bound(model, node, initializers) -> str:
    """Clip(X, min) as Clip(X, min, +inf), so that one function signature covers both."""
    lower = numpy_helper.to_array(initializers[node.input[1]])
    name = f"{node.output[0]}_dual_slope_max"  # tensor names are unique; node names may be empty
    model.graph.initializer.append(numpy_helper.from_array(np.full_like(lower, np.inf), name))
    return name


def save_proxy(model: onnx.ModelProto, path) -> None:
    """Check the proxy model with onnx.checker, then write it atomically: a temporary file in the same folder
    replaces `path` only once complete, so an interrupted run never leaves a truncated model behind."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"the proxy model fails onnx.checker: {error}", exit_code=1) from None
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        onnx.save(model, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def count_dual_slope_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for node in model.graph.node if node.domain == DOMAIN)


# ------------------------------------------------------------------------------------------- torch side


class DualSlopeFunction(torch.autograd.Function):
    """y = the original rectifier of x; dy/dx = 1 for x > 0, the backward slope for x <= 0, 0 from `upper` on.

    x = 0 takes the negative side, as torch's own relu does, so that backward slope = forward slope
    reproduces ordinary autograd exactly.
    """

    @staticmethod
    def forward(ctx, x, forward_slope, backward_slope, upper):
        if upper is not None:
            y = torch.clamp(x, min=0.0, max=upper)
        elif isinstance(forward_slope, torch.Tensor):
            y = torch.where(x >= 0, x, x * forward_slope)
        elif forward_slope == 0.0:
            y = torch.relu(x)
        else:
            y = nn.functional.leaky_relu(x, forward_slope)
        slope_tensor = forward_slope if isinstance(forward_slope, torch.Tensor) else None
        ctx.save_for_backward(x, slope_tensor)
        ctx.backward_slope = forward_slope if backward_slope is None else backward_slope
        ctx.upper = upper
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, slope_tensor = ctx.saved_tensors
        grad_x = _negative_side_scaled(grad_output, x, ctx.backward_slope)
        if ctx.upper is not None:
            # zero at the bound itself too, as torch's ReLU6 (hardtanh), the module onnx2torch makes of Clip(0, 6)
            grad_x = grad_x.masked_fill(x >= ctx.upper, 0.0)
        grad_slope = None
        if slope_tensor is not None and ctx.needs_input_grad[1]:
            grad_slope = _sum_to_shape(grad_output * torch.where(x >= 0, 0.0, x), slope_tensor.shape)
        return grad_x, grad_slope, None, None


def _negative_side_scaled(grad_output: torch.Tensor, x: torch.Tensor, slope) -> torch.Tensor:
    """grad_output where x > 0, grad_output * slope where x <= 0."""
    if isinstance(slope, torch.Tensor):
        return torch.where(x > 0, grad_output, grad_output * slope)
    # leaky_relu's own backward kernel computes exactly this in one pass, without temporary tensors
    return torch.ops.aten.leaky_relu_backward(grad_output, x, slope, False)


def _sum_to_shape(tensor: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast result back to the shape of the operand that was broadcast."""
    leading = tensor.dim() - len(shape)
    tensor = tensor.sum(dim=tuple(range(leading))) if leading else tensor
    axes = tuple(axis for axis, size in enumerate(shape) if size == 1 and tensor.shape[axis] != 1)
    return tensor.sum(dim=axes, keepdim=True) if axes else tensor


class DualSlope(nn.Module):
    """One rewritten rectifier. `backward_slope` may be changed at any time (None = the forward slope)."""

    def __init__(self, node_name: str, op_type: str, forward_slope, backward_slope, upper=None):
        super().__init__()
        self.node_name = node_name
        self.op_type = op_type
        if isinstance(forward_slope, torch.Tensor):
            self.forward_slope = nn.Parameter(forward_slope)
        else:
            self.forward_slope = float(forward_slope)
        self.backward_slope = backward_slope
        self.upper = upper

    def forward(self, x):
        return DualSlopeFunction.apply(x, self.forward_slope, self.backward_slope, self.upper)

    def extra_repr(self) -> str:
        forward = "learned" if isinstance(self.forward_slope, torch.Tensor) else self.forward_slope
        return f"{self.op_type} '{self.node_name}', forward_slope={forward}, backward_slope={self.backward_slope}"


def dual_slope_modules(module: nn.Module) -> list[DualSlope]:
    return [child for child in module.modules() if isinstance(child, DualSlope)]


def set_backward_slope(module: nn.Module, slope) -> int:
    """Set the backward slope of every dual-slope op in a converted proxy module, without converting again.

    `slope` is a float, None (the forward slope: ordinary gradients), or a dict {ONNX node name: float|None}
    for per-layer slopes (layers not named keep theirs). Returns how many ops were changed.
    """
    ops = dual_slope_modules(module)
    if isinstance(slope, dict):
        unknown = sorted(set(slope) - {op.node_name for op in ops})
        if unknown:
            raise ValueError(f"no dual-slope op for the nodes {', '.join(unknown)}")
    changed = 0
    for op in ops:
        if isinstance(slope, dict):
            if op.node_name not in slope:
                continue
            op.backward_slope = slope[op.node_name]
        else:
            op.backward_slope = slope
        changed += 1
    return changed


def _constant(graph, name: str) -> torch.Tensor:
    return graph.initializers[name].to_torch()


def _converter(op_type):
    def convert(node, graph) -> OperationConverterResult:
        backward_slope = node.attributes.get("backward_slope", DEFAULT_BACKWARD_SLOPE)
        upper = None
        if op_type == "Relu":
            forward_slope = 0.0
        elif op_type == "LeakyRelu":
            forward_slope = node.attributes.get("alpha", 0.01)
        elif op_type == "PRelu":
            forward_slope = _constant(graph, node.input_values[1])
        else:
            forward_slope = 0.0
            upper = float(_constant(graph, node.input_values[2]))
            upper = None if upper == math.inf else upper  # Clip(min=0) without max is Relu
        module = DualSlope(node.name, op_type, forward_slope, backward_slope, upper)
        return OperationConverterResult(module, OnnxMapping(inputs=node.input_values[:1], outputs=node.output_values))

    return convert


for _original, _custom in _OP_TYPE.items():
    add_converter(operation_type=_custom, version=DOMAIN_VERSION, domain=DOMAIN)(_converter(_original))
