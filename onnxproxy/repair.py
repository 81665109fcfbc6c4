"""Repairing an ONNX model for onnx2torch: only the fixes a model needs, each one a small pass that keeps the
original graph's tensor names (validation looks tensors up by them).

The passes use onnx's own tools (version converter, shape inference, reference evaluator, extractor) and
onnxruntime's symbolic shape inference. The others are small and hand-written: onnxsim, onnxslim,
onnxoptimizer and onnx-graphsurgeon were tried, none makes auto_pad explicit, and those that fold constants
or fix shapes also rename or fuse tensors that validation looks up by their original names."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxproxy import protos
from onnxproxy.errors import UserError

_ML_DOMAIN = "ai.onnx.ml"


def repair(model: onnx.ModelProto, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Apply only the fixes this model needs for onnx2torch; returns the repaired copy and what was done.
    The original graph's tensor names all stay (nodes that only compute constants become initializers)."""
    repaired = protos.copy(model)
    repairs: list[str] = []
    repaired.ir_version = max(repaired.ir_version, 4)  # from IR 4 on, initializers need not be graph inputs
    _drop_initializer_inputs(repaired, repairs)
    _apply_input_shapes(repaired, input_shapes or {}, repairs)
    _topological_sort(repaired, repairs)
    repaired = _cut_ml_tail(repaired, repairs)
    repaired = _convert_opset(repaired, repairs)
    _fold_constants(repaired, repairs)  # after the conversion, which writes Constant nodes of its own
    _drop_noop_allowzero(repaired, repairs)
    _drop_unused_outputs(repaired, repairs)
    repaired = _infer_shapes(repaired, repairs)
    _explicit_auto_pads(repaired, repairs)
    _pad_average_pools(repaired, repairs)
    _free_reshape_batch(repaired, repairs)
    return repaired, repairs


def _drop_initializer_inputs(model, repairs):
    initializers = {tensor.name for tensor in model.graph.initializer}
    real_inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(real_inputs) != len(model.graph.input):
        repairs.append(f"removed {len(model.graph.input) - len(real_inputs)} initializers listed as graph inputs")
        del model.graph.input[:]
        model.graph.input.extend(real_inputs)


def _apply_input_shapes(model, input_shapes, repairs):
    """Fix the non-batch dimensions of the named inputs; the batch dimension stays as the model has it."""
    inputs = {value.name: value for value in model.graph.input}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise UserError(f"--input-shape {name}: no such input; the model has {', '.join(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise UserError(f"--input-shape {name}: the input has {len(shape.dim)} dimensions, got {len(dims)}")
        for dim, size in zip(list(shape.dim)[1:], dims[1:]):
            dim.Clear()
            dim.dim_value = size
        repairs.append(f"fixed input shape {name} to {dims} (batch stays free)")



def _topological_sort(model, repairs):
    order = protos.topological_order(model.graph)
    if order != sorted(order):
        repairs.append("sorted nodes topologically")
        protos.replace_nodes(model.graph, [model.graph.node[index] for index in order])



def _add_initializer(graph, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _drop_opset_import(model, domain: str):
    kept = [entry for entry in model.opset_import if entry.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(kept)



def _cut_ml_tail(model, repairs):
    """skl2onnx-style classifiers end in ai.onnx.ml ops (ZipMap, ArrayFeatureExtractor, ...) that onnx2torch
    cannot convert: keep the graph up to the float tensors those ops read, e.g. `probabilities`."""
    graph = model.graph
    tail = _ml_tail(graph)
    if not tail:
        return model
    typed = onnx.shape_inference.infer_shapes(model)
    values = {value.name: value for value in list(typed.graph.value_info) + list(typed.graph.output)}
    head_outputs = {name for index, node in enumerate(graph.node) if index not in tail for name in node.output}
    read_by_tail = [name for index in sorted(tail) for name in graph.node[index].input]
    kept_outputs = [value.name for value in graph.output if value.name in head_outputs]
    new_outputs = list(dict.fromkeys(
        name for name in kept_outputs + read_by_tail
        if name in head_outputs and name in values and protos.value_dtype(values[name]) in protos.FLOAT_DTYPES
    ))
    tail_ops = ", ".join(sorted({graph.node[index].op_type for index in tail}))
    if not new_outputs:
        raise UserError(
            f"the model's classifier is made of ai.onnx.ml ops ({tail_ops}) that onnx2torch cannot convert, "
            "and no float tensor comes before them"
        )
    inputs = [value.name for value in graph.input]
    cut = onnx.utils.Extractor(typed).extract_model(inputs, new_outputs)
    cut.ir_version = model.ir_version
    cut.producer_name, cut.producer_version = model.producer_name, model.producer_version
    _drop_opset_import(cut, _ML_DOMAIN)
    repairs.append(f"cut the ai.onnx.ml tail ({tail_ops}): onnxproxy works on {', '.join(new_outputs)}")
    return cut


def _ml_tail(graph) -> set[int]:
    """Indices of the ai.onnx.ml nodes and of every node that depends on one (the graph is sorted)."""
    tail, tainted = set(), set()
    for index, node in enumerate(graph.node):
        if node.domain == _ML_DOMAIN or any(name in tainted for name in node.input):
            tail.add(index)
            tainted.update(node.output)
    return tail


_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "If", "Loop", "Scan"}


def _fold_constants(model, repairs):
    """Evaluate every node whose inputs are all constants (Constant nodes, Identity of an initializer,
    ConstantOfShape weights, ...) with onnx's reference evaluator, turning its outputs into initializers of
    the same names."""
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    graph_outputs = {value.name for value in graph.output}
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    kept, folded = [], Counter()
    for node in graph.node:
        arrays = _evaluate_if_constant(node, constants, graph_outputs, opsets)
        if arrays is None:
            kept.append(node)
            continue
        for name, array in zip(node.output, arrays):
            constants[name] = numpy_helper.from_array(np.asarray(array), name)
            graph.initializer.append(constants[name])
        folded[node.op_type] += 1
    if folded:
        protos.replace_nodes(graph, kept)
        kinds = ", ".join(f"{op} x{count}" for op, count in folded.most_common())
        repairs.append(f"folded {sum(folded.values())} constant-only nodes into initializers ({kinds})")


def _evaluate_if_constant(node, constants, graph_outputs, opsets):
    foldable = (
        node.domain in protos.DEFAULT_DOMAINS
        and node.op_type not in _NOT_FOLDABLE
        and all(name in constants or name == "" for name in node.input)
        and not any(name in graph_outputs for name in node.output)
    )
    if not foldable:
        return None
    from onnx.reference import ReferenceEvaluator

    feeds = {name: numpy_helper.to_array(constants[name]) for name in node.input if name}
    try:
        return ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
    except Exception:  # an op or revision the reference evaluator lacks: leave the node to onnx2torch
        return None


def _drop_noop_allowzero(model, repairs):
    """onnx2torch rejects Reshape with allowzero=1; it changes nothing when the target shape has no 0."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    dropped = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if "allowzero" in protos.attributes(node) and 0 not in numpy_helper.to_array(constants[node.input[1]]):
            protos.drop_attributes(node, "allowzero")
            dropped += 1
    if dropped:
        repairs.append(f"dropped a no-op allowzero from {dropped} Reshape nodes")


def _free_reshape_batch(model, repairs):
    """Exporters run with batch size 1 write Reshape(x, [1, -1]); onnxproxy optimizes many inputs as one batch.
    A leading 1 where the data's leading (batch) dimension is 1 becomes 0, Reshape's "copy this dimension"."""
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    shapes = protos.shapes_by_tensor(graph)
    freed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in constants or protos.attributes(node).get("allowzero"):
            continue
        target = numpy_helper.to_array(constants[node.input[1]])
        data_shape = shapes.get(node.input[0], [])
        if target.ndim == 1 and target.size and target[0] == 1 and data_shape[:1] == [1]:
            freed_target = target.copy()
            freed_target[0] = 0
            node.input[1] = _add_initializer(graph, f"{node.input[1]}_free_batch_{freed}", freed_target)
            freed += 1
    if freed:
        repairs.append(f"freed the batch size fixed at 1 in {freed} Reshape targets")


_CONVERTIBLE_OPSETS = range(13, 18)  # opsets whose op revisions onnx2torch 1.5.15 converts after repair
_TARGET_OPSETS = (13, 17)
_HIDDEN_DOMAIN = "onnxproxy.hidden"


def _convert_opset(model, repairs):
    opset = protos.default_opset(model)
    if opset in _CONVERTIBLE_OPSETS:
        return model
    if opset > _CONVERTIBLE_OPSETS[-1]:
        _decompose_gelu(model, repairs)
    errors = []
    for target in _TARGET_OPSETS:
        try:
            converted = _convert_version(model, target)
        except Exception as error:  # the converter raises RuntimeError/ConvertError/IndexError by op
            errors.append(f"{target}: {error}")
            continue
        repairs.append(f"converted opset {opset} -> {target}")
        return converted
    raise UserError(f"cannot convert opset {opset} to one onnx2torch supports ({'; '.join(errors)})")


def _convert_version(model, target):
    """onnx's version converter, around its missing down-adapters for Split-18 and Pad-18+: where those
    mean what Split-13 and Pad-13 mean, they pass the converter hidden in a domain of our own."""
    hidden = protos.copy(model)
    downward = protos.default_opset(model) > target
    for node in hidden.graph.node:
        if downward and node.domain in protos.DEFAULT_DOMAINS and _means_the_same_in_revision_13(node):
            node.domain = _HIDDEN_DOMAIN
    hidden.opset_import.append(helper.make_opsetid(_HIDDEN_DOMAIN, 1))
    converted = onnx.version_converter.convert_version(hidden, target)
    for node in converted.graph.node:
        if node.domain == _HIDDEN_DOMAIN:
            node.domain = ""
            protos.drop_attributes(node, "num_outputs")
    _drop_opset_import(converted, _HIDDEN_DOMAIN)
    return converted


def _means_the_same_in_revision_13(node) -> bool:
    """Split-18's num_outputs equals Split-13's equal parts, one per output (an uneven split would show in
    the check against onnxruntime); Pad-18+ equals Pad-13 without its axes input and wrap mode."""
    if node.op_type == "Split":
        return True
    if node.op_type == "Pad":
        return (len(node.input) < 4 or not node.input[3]) and protos.attributes(node).get("mode") != b"wrap"
    return False


def _decompose_gelu(model, repairs):
    """Gelu exists from opset 20 on only (the version converter cannot take it down, onnx2torch has no
    converter): spell it out with Erf, or with Tanh for approximate="tanh"."""
    graph = model.graph
    nodes, decomposed = [], 0
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in protos.DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        nodes.extend(_gelu_nodes(node, protos.attributes(node).get("approximate") == b"tanh", graph))
        decomposed += 1
    if decomposed:
        protos.replace_nodes(graph, nodes)
        repairs.append(f"decomposed {decomposed} Gelu nodes into elementary ops")


def _gelu_nodes(node, tanh: bool, graph) -> list:
    """0.5·x·(1 + erf(x/√2)), or 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), with float32 constants."""
    x, y = node.input[0], node.output[0]
    prefix = f"{y}_gelu"
    nodes = []

    def constant(name, value):
        return _add_initializer(graph, f"{prefix}_{name}", np.array(value, np.float32))

    def step(op, *inputs, output=None):
        output = output or f"{prefix}_{len(nodes)}"
        nodes.append(helper.make_node(op, list(inputs), [output], f"{node.name}/{op}_{len(nodes)}"))
        return output

    if tanh:
        cube = step("Mul", step("Mul", x, x), x)
        inner = step("Add", x, step("Mul", cube, constant("cubic", 0.044715)))
        gate = step("Tanh", step("Mul", inner, constant("root_2_over_pi", math.sqrt(2 / math.pi))))
    else:
        gate = step("Erf", step("Mul", x, constant("root_half", math.sqrt(0.5))))
    step("Mul", step("Mul", step("Add", gate, constant("one", 1.0)), x), constant("half", 0.5), output=y)
    return nodes


def _infer_shapes(model, repairs):
    """onnx's shape inference; where it leaves node outputs without a shape (typically after a Reshape
    whose target shape is computed from Shape ops), onnxruntime's symbolic shape inference fills them in."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    missing = _tensors_without_shape(inferred)
    if not missing:
        return inferred
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        symbolic = SymbolicShapeInference.infer_shapes(inferred, auto_merge=True, guess_output_rank=True)
    except Exception:  # it raises on ops it does not know; onnx's partial result is then the best there is
        return inferred
    if symbolic is None:
        return inferred
    filled = len(missing) - len(_tensors_without_shape(symbolic))
    if filled > 0:
        repairs.append(f"inferred {filled} tensor shapes with onnxruntime's symbolic shape inference")
    return symbolic


def _tensors_without_shape(model) -> list[str]:
    graph = model.graph
    shaped = {value.name for value in list(graph.value_info) + list(graph.output) + list(graph.input)
              if value.type.tensor_type.HasField("shape")}
    return [name for node in graph.node for name in node.output if name and name not in shaped]


_AUTO_PAD_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")


def _explicit_auto_pads(model, repairs):
    """onnx2torch rejects auto_pad=SAME_*: write the pads the ONNX spec implies for the inferred input size.
    Nodes whose input size is unknown are left as they are (the free-dimension check explains them)."""
    shapes = protos.shapes_by_tensor(model.graph)
    explicit = 0
    for node in model.graph.node:
        attributes = protos.attributes(node)
        mode = attributes.get("auto_pad", b"NOTSET").decode()
        if node.op_type not in _AUTO_PAD_OPS or not mode.startswith("SAME"):
            continue
        spatial = (shapes.get(node.input[0]) or [])[2:]
        kernel = attributes.get("kernel_shape") or (shapes.get(node.input[1]) or [])[2:]
        if not spatial or not all(isinstance(size, int) for size in spatial + list(kernel)):
            continue
        strides = attributes.get("strides", [1] * len(spatial))
        dilations = attributes.get("dilations", [1] * len(spatial))
        pads = _same_pads(spatial, kernel, strides, dilations, upper=mode == "SAME_UPPER")
        protos.drop_attributes(node, "auto_pad", "pads")
        node.attribute.append(helper.make_attribute("pads", pads))
        explicit += 1
    if explicit:
        repairs.append(f"wrote explicit pads for {explicit} nodes with auto_pad=SAME_*")


def _same_pads(spatial, kernel, strides, dilations, upper: bool) -> list[int]:
    """ONNX's SAME padding: output size ceil(input / stride); the odd pixel goes at the end for SAME_UPPER."""
    begins, ends = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


def _drop_unused_outputs(model, repairs):
    """onnx2torch maps a node's outputs one to one onto its torch module's: optional outputs nobody reads
    (Dropout's mask, MaxPool's indices, BatchNormalization's training statistics) break that."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    trimmed = 0
    for node in graph.node:
        while len(node.output) > 1 and node.output[-1] not in read:
            node.output.pop()
            trimmed += 1
    if trimmed:
        repairs.append(f"dropped {trimmed} optional node outputs that nothing reads")


def _pad_average_pools(model, repairs):
    """onnx2torch rejects AveragePool with asymmetric pads: pad with zeros first, pool without pads, and
    where the padding must not count (count_include_pad=0) rescale by the constant window sizes."""
    graph = model.graph
    shapes = protos.shapes_by_tensor(graph)
    elem_types = {value.name: value.type.tensor_type.elem_type for value in list(graph.value_info) + list(graph.input)}
    rewritten, nodes = 0, []
    for node in graph.node:
        replacement = _padded_average_pool(node, shapes, elem_types, graph)
        nodes.extend(replacement or [node])
        rewritten += replacement is not None
    if rewritten:
        protos.replace_nodes(graph, nodes)
        repairs.append(f"split the asymmetric padding off {rewritten} AveragePool nodes into Pad nodes")


def _padded_average_pool(node, shapes, elem_types, graph):
    """[Pad, AveragePool, maybe Mul] computing what `node` computes, or None where it needs no change."""
    attributes = protos.attributes(node)
    pads = attributes.get("pads", [])
    rank = len(pads) // 2
    input_shape = shapes.get(node.input[0]) or []
    if (node.op_type != "AveragePool" or pads[:rank] == pads[rank:] or attributes.get("ceil_mode", 0)
            or len(input_shape) != rank + 2 or not all(isinstance(size, int) for size in input_shape[2:])):
        return None
    begins, ends, kernel = pads[:rank], pads[rank:], attributes["kernel_shape"]
    elem_type, output = elem_types[node.input[0]], node.output[0]
    padded, unscaled = f"{output}_padded", f"{output}_unscaled"
    padded_shape = input_shape[:2] + [size + begin + end for size, begin, end in zip(input_shape[2:], begins, ends)]
    graph.value_info.append(helper.make_tensor_value_info(padded, elem_type, padded_shape))
    pads_name = _add_initializer(graph, f"{padded}_pads", np.array([0, 0, *begins, 0, 0, *ends], np.int64))
    pad = helper.make_node("Pad", [node.input[0], pads_name], [padded], f"{node.name}_pad")
    pool = protos.copy(node)
    pool.input[0] = padded
    protos.drop_attributes(pool, "pads", "count_include_pad")
    counts = _window_counts(input_shape[2:], kernel, attributes.get("strides", [1] * rank), begins, ends)
    if attributes.get("count_include_pad", 0) or (counts == np.prod(kernel)).all():
        return [pad, pool]
    pool.output[0] = unscaled
    graph.value_info.append(helper.make_tensor_value_info(unscaled, elem_type, shapes.get(output)))
    scale = (np.prod(kernel) / counts)[None, None].astype(helper.tensor_dtype_to_np_dtype(elem_type))
    scale_name = _add_initializer(graph, f"{output}_window_scale", scale)
    return [pad, pool, helper.make_node("Mul", [unscaled, scale_name], [output], f"{node.name}_rescale")]


def _window_counts(spatial, kernel, strides, begins, ends) -> np.ndarray:
    """How many real (not padded) pixels each pooling window covers, per output position."""
    per_axis = []
    for size, k, stride, begin, end in zip(spatial, kernel, strides, begins, ends):
        starts = np.arange((size + begin + end - k) // stride + 1) * stride - begin
        per_axis.append(np.minimum(starts + k, size) - np.maximum(starts, 0))
    counts = per_axis[0]
    for axis_counts in per_axis[1:]:
        counts = np.multiply.outer(counts, axis_counts)
    return counts
