"""Loading an ONNX classifier: read it safely, repair it for onnx2torch, inventory its nodes, resolve
`--node` names, cut the graph at a target tensor, convert it to torch and check the conversion.

The repair pass uses onnx's own tools (version converter, shape inference, reference evaluator, extractor)
and onnxruntime's symbolic shape inference. The remaining passes are small and hand-written: onnxsim,
onnxslim, onnxoptimizer and onnx-graphsurgeon were tried, none makes auto_pad explicit, and those that fold
constants or fix shapes also rename or fuse tensors that validation looks up by their original names."""

from __future__ import annotations

import difflib
import heapq
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxproxy.errors import UserError
from onnxproxy.settings import DEFAULT_ATOL, DEFAULT_RTOL

RECTIFIER_OPS = ("Relu", "LeakyRelu", "PRelu", "Clip")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_ML_DOMAIN = "ai.onnx.ml"


@dataclass
class TensorInfo:
    name: str
    shape: list  # ints for known dimensions, strings or None for free ones
    dtype: str

    @property
    def layout(self) -> str:
        """NCHW or NHWC for 4-D image inputs (a guess from where the small channel axis is), else '-'."""
        if len(self.shape) != 4:
            return "-"
        channels_first, channels_last = self.shape[1], self.shape[3]
        if isinstance(channels_last, int) and channels_last <= 4 and not (
            isinstance(channels_first, int) and channels_first <= 4
        ):
            return "NHWC"
        return "NCHW"

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES


@dataclass
class NodeInfo:
    index: int  # position in graph order (the original nodes, topologically sorted)
    name: str
    op_type: str
    output: str  # the node's first output tensor, the one `--node` targets
    shape: list  # [] for scalars and where unknown (outputs the repair pass cut away, non-tensor outputs)
    rectifier: bool
    outputs: list = field(default_factory=list)  # all its output tensors

    @property
    def channels(self):
        return self.shape[1] if len(self.shape) >= 2 else None


@dataclass
class LoadedModel:
    path: Path
    original: onnx.ModelProto  # as read from disk (unnamed nodes get names); what onnxruntime runs
    repaired: onnx.ModelProto  # what onnx2torch converts
    input: TensorInfo
    outputs: list[TensorInfo]
    nodes: list[NodeInfo]
    repairs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    def node_by_output(self, tensor: str) -> NodeInfo:
        return next(node for node in self.nodes if node.output == tensor)


# ---------------------------------------------------------------------------------------------- reading


def read_model(path) -> onnx.ModelProto:
    """Read an ONNX file and its external data, refusing data files outside the model's folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises several unrelated types for a bad file
        raise UserError(
            f"{path}: not a readable ONNX model, truncated or another format ({type(error).__name__})"
        ) from None
    if not model.graph.node:
        raise UserError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    folder = path.resolve().parent
    external = [tensor for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        data_path = (folder / location).resolve()
        if folder not in data_path.parents:
            raise UserError(f"{path}: external data '{location}' points outside the model's folder; refusing it")
        if not data_path.is_file():
            raise UserError(f"{path}: external data file '{location}' is missing")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(folder))
        except Exception as error:
            raise UserError(f"{path}: cannot read its external data ({type(error).__name__}: {error})") from None
    return model


# --------------------------------------------------------------------------------------------- repairing


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a stable name `<OpType>_<index in the file's node order>`; returns how many."""
    taken = {node.name for node in model.graph.node}
    named = 0
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
            named += 1
    return named


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


def _sorted_nodes(graph) -> list:
    return [graph.node[index] for index in _topological_order(graph)]


def _topological_order(graph) -> list[int]:
    """Node indices in a topological order that keeps the file's order wherever it allows."""
    sources = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    known = sources | producer.keys()
    missing = sorted({name for node in graph.node for name in node.input if name not in known})
    if missing:
        raise UserError(f"the graph reads tensors nobody produces: {', '.join(missing[:5])}")
    waiting_on = [{producer[name] for name in node.input if name not in sources} for node in graph.node]
    consumers = [[] for _ in graph.node]
    for index, producers in enumerate(waiting_on):
        for source in producers:
            consumers[source].append(index)
    ready = [index for index, producers in enumerate(waiting_on) if not producers]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers[index]:
            waiting_on[consumer].discard(index)
            if not waiting_on[consumer]:
                heapq.heappush(ready, consumer)
    if len(order) != len(graph.node):
        raise UserError("the graph has a cycle")
    return order


def _topological_sort(model, repairs):
    order = _topological_order(model.graph)
    if order != sorted(order):
        repairs.append("sorted nodes topologically")
        _replace_nodes(model.graph, [model.graph.node[index] for index in order])


def _replace_nodes(graph, nodes):
    copies = [_copy(node) for node in nodes]  # copied before the repeated field they live in is cleared
    del graph.node[:]
    graph.node.extend(copies)


def _copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _attributes(node) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _drop_attributes(node, *names):
    kept = [attribute for attribute in node.attribute if attribute.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


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
        if name in head_outputs and name in values and _tensor_info(values[name]).is_float
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
        _replace_nodes(graph, kept)
        kinds = ", ".join(f"{op} x{count}" for op, count in folded.most_common())
        repairs.append(f"folded {sum(folded.values())} constant-only nodes into initializers ({kinds})")


def _evaluate_if_constant(node, constants, graph_outputs, opsets):
    foldable = (
        node.domain in _DEFAULT_DOMAINS
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
        if "allowzero" in _attributes(node) and 0 not in numpy_helper.to_array(constants[node.input[1]]):
            _drop_attributes(node, "allowzero")
            dropped += 1
    if dropped:
        repairs.append(f"dropped a no-op allowzero from {dropped} Reshape nodes")


_CONVERTIBLE_OPSETS = range(13, 18)  # opsets whose op revisions onnx2torch 1.5.15 converts after repair
_TARGET_OPSETS = (13, 17)
_HIDDEN_DOMAIN = "onnxproxy.hidden"


def _default_opset(model) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS), 1)


def _convert_opset(model, repairs):
    opset = _default_opset(model)
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
    hidden = _copy(model)
    downward = _default_opset(model) > target
    for node in hidden.graph.node:
        if downward and node.domain in _DEFAULT_DOMAINS and _means_the_same_in_revision_13(node):
            node.domain = _HIDDEN_DOMAIN
    hidden.opset_import.append(helper.make_opsetid(_HIDDEN_DOMAIN, 1))
    converted = onnx.version_converter.convert_version(hidden, target)
    for node in converted.graph.node:
        if node.domain == _HIDDEN_DOMAIN:
            node.domain = ""
            _drop_attributes(node, "num_outputs")
    _drop_opset_import(converted, _HIDDEN_DOMAIN)
    return converted


def _means_the_same_in_revision_13(node) -> bool:
    """Split-18's num_outputs equals Split-13's equal parts, one per output (an uneven split would show in
    the check against onnxruntime); Pad-18+ equals Pad-13 without its axes input and wrap mode."""
    if node.op_type == "Split":
        return True
    if node.op_type == "Pad":
        return (len(node.input) < 4 or not node.input[3]) and _attributes(node).get("mode") != b"wrap"
    return False


def _decompose_gelu(model, repairs):
    """Gelu exists from opset 20 on only (the version converter cannot take it down, onnx2torch has no
    converter): spell it out with Erf, or with Tanh for approximate="tanh"."""
    graph = model.graph
    nodes, decomposed = [], 0
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in _DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        nodes.extend(_gelu_nodes(node, _attributes(node).get("approximate") == b"tanh", graph))
        decomposed += 1
    if decomposed:
        _replace_nodes(graph, nodes)
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
    shapes = _shapes_by_tensor(model.graph)
    explicit = 0
    for node in model.graph.node:
        attributes = _attributes(node)
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
        _drop_attributes(node, "auto_pad", "pads")
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
    shapes = _shapes_by_tensor(graph)
    elem_types = {value.name: value.type.tensor_type.elem_type for value in list(graph.value_info) + list(graph.input)}
    rewritten, nodes = 0, []
    for node in graph.node:
        replacement = _padded_average_pool(node, shapes, elem_types, graph)
        nodes.extend(replacement or [node])
        rewritten += replacement is not None
    if rewritten:
        _replace_nodes(graph, nodes)
        repairs.append(f"split the asymmetric padding off {rewritten} AveragePool nodes into Pad nodes")


def _padded_average_pool(node, shapes, elem_types, graph):
    """[Pad, AveragePool, maybe Mul] computing what `node` computes, or None where it needs no change."""
    attributes = _attributes(node)
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
    pool = _copy(node)
    pool.input[0] = padded
    _drop_attributes(pool, "pads", "count_include_pad")
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


def repair(model: onnx.ModelProto, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Apply only the fixes this model needs for onnx2torch; returns the repaired copy and what was done.
    The original graph's tensor names all stay (nodes that only compute constants become initializers)."""
    repaired = _copy(model)
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
    return repaired, repairs


# -------------------------------------------------------------------------------------------- inventory


def _tensor_info(value) -> TensorInfo:
    tensor_type = value.type.tensor_type
    shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "unknown"
    return TensorInfo(value.name, shape, dtype)


def _shapes_by_tensor(graph) -> dict[str, list]:
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    for value in list(graph.value_info) + list(graph.output) + list(graph.input):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = _tensor_info(value).shape
    return shapes


def _is_rectifier(node, initializers) -> bool:
    if node.op_type in ("Relu", "LeakyRelu", "PRelu"):
        return True
    if node.op_type == "Clip":
        return clip_bounds(node, initializers)[0] == 0.0
    return False


def clip_bounds(node, initializers) -> tuple[float | None, float | None]:
    """Clip's (min, max) as floats where they are constants (attributes before opset 11, inputs after)."""
    attributes = _attributes(node)
    if "min" in attributes or "max" in attributes:
        return attributes.get("min"), attributes.get("max")
    bounds = []
    for position in (1, 2):
        name = node.input[position] if len(node.input) > position else ""
        bounds.append(float(numpy_helper.to_array(initializers[name])) if name in initializers else None)
    return tuple(bounds)


def inventory(original: onnx.ModelProto, repaired: onnx.ModelProto) -> list[NodeInfo]:
    """Every node of the original graph in topological order, with output shapes from the repaired graph
    (whose tensor names are the original's; folded constants are initializers there)."""
    shapes = _shapes_by_tensor(repaired.graph)
    initializers = {tensor.name: tensor for tensor in repaired.graph.initializer}
    return [
        NodeInfo(index, node.name, node.op_type, node.output[0], shapes.get(node.output[0], []),
                 _is_rectifier(node, initializers), list(node.output))
        for index, node in enumerate(_sorted_nodes(original.graph))
    ]


def real_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    """The graph inputs that are not initializers (old IR versions list those as inputs too)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [_tensor_info(value) for value in model.graph.input if value.name not in initializers]


def _select_input(model, input_name) -> TensorInfo:
    inputs = real_inputs(model)
    if input_name is not None:
        chosen = [info for info in inputs if info.name == input_name]
        if not chosen:
            raise UserError(f"--input {input_name}: no such input; the model has {', '.join(i.name for i in inputs)}")
        if not chosen[0].is_float:
            raise UserError(f"--input {input_name}: it is {chosen[0].dtype}; onnxproxy optimizes a float input")
        return chosen[0]
    float_inputs = [info for info in inputs if info.is_float]
    if not float_inputs:
        found = ", ".join(f"{info.name} ({info.dtype})" for info in inputs) or "none"
        raise UserError(f"the model has no float input (inputs: {found}); onnxproxy optimizes a float input tensor")
    if len(inputs) > 1:
        raise UserError(f"the model has several inputs ({', '.join(i.name for i in inputs)}): choose one with --input")
    return float_inputs[0]


def _check_free_dimensions(input_info: TensorInfo):
    for axis, size in enumerate(input_info.shape[1:], start=1):
        if not isinstance(size, int):
            example = ",".join(["1"] + [str(dim) if isinstance(dim, int) else str(dim or f"D{index}").upper()
                                        for index, dim in enumerate(input_info.shape[1:], start=1)])
            raise UserError(f"input '{input_info.name}' has a free dimension {axis} ('{size or '?'}'): "
                            f"give its size with --input-shape {input_info.name}:{example}")


def load_model(path, input_shapes: dict | None = None, input_name: str | None = None) -> LoadedModel:
    """Read, name, repair and inventory a model. `input_shapes` maps input names to full shapes."""
    original = read_model(path)
    name_unnamed_nodes(original)
    try:
        repaired, repairs = repair(original, input_shapes)
    except UserError as error:
        raise UserError(f"{path}: {error}", error.exit_code) from None
    except Exception as error:
        raise UserError(f"{path}: cannot repair the model for conversion: {type(error).__name__}: {error}") from None
    model_input = _select_input(repaired, input_name)
    _check_free_dimensions(model_input)
    outputs = [_tensor_info(value) for value in repaired.graph.output]
    return LoadedModel(Path(path), original, repaired, model_input, outputs, inventory(original, repaired), repairs)


def parse_input_shape(specs) -> dict:
    """`NAME:D1,D2,...` options into {name: [dims]}."""
    shapes = {}
    for spec in specs or ():
        name, _, dims = spec.rpartition(":")
        try:
            shapes[name] = [int(dim) for dim in dims.split(",")]
        except ValueError:
            raise UserError(f"--input-shape {spec}: expected NAME:D1,D2,... with integer dimensions") from None
        if not name:
            raise UserError(f"--input-shape {spec}: expected NAME:D1,D2,...")
    return shapes


# ------------------------------------------------------------------------------------------- addressing

_INSPECT_HINT = "Run `onnxproxy inspect MODEL` to list every node."


def resolve_node(model: LoadedModel, spec: str) -> NodeInfo:
    """`--node X`: an ONNX node name, then an output tensor name, then an unambiguous case-insensitive
    suffix or substring of one."""
    for matches in (
        [node for node in model.nodes if node.name == spec],
        [node for node in model.nodes if spec in node.outputs],
    ):
        if matches:
            return matches[0]
    lowered = spec.lower()
    for predicate in (str.endswith, str.__contains__):
        matches = [node for node in model.nodes
                   if predicate(node.name.lower(), lowered) or predicate(node.output.lower(), lowered)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(node.name for node in matches[:8]) + (", ..." if len(matches) > 8 else "")
            raise UserError(f"--node {spec} is ambiguous: it matches {len(matches)} nodes ({listed}). {_INSPECT_HINT}")
    names = [node.name for node in model.nodes] + [node.output for node in model.nodes]
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UserError(f"--node {spec}: no such node or tensor.{hint} {_INSPECT_HINT}")


# ---------------------------------------------------------------------------------------- cut & convert


def cut_at(model: onnx.ModelProto, input_name: str, tensor: str) -> onnx.ModelProto:
    """The part of the graph that computes `tensor` from `input_name`, as its own model."""
    if tensor in {initializer.name for initializer in model.graph.initializer}:
        raise UserError(f"tensor '{tensor}' is a constant: it does not depend on the input '{input_name}'")
    known = {value.name for value in list(model.graph.value_info) + list(model.graph.output)}
    if tensor not in known:
        raise UserError(f"tensor '{tensor}' is not in the converted graph (see the repairs `onnxproxy inspect` lists)")
    extracted = onnx.utils.Extractor(model).extract_model([input_name], [tensor])
    extracted.opset_import.extend(
        entry for entry in model.opset_import if entry.domain not in {e.domain for e in extracted.opset_import}
    )
    if input_name not in {value.name for value in extracted.graph.input}:
        raise UserError(f"tensor '{tensor}' does not depend on the input '{input_name}'")
    return extracted


def _unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    from onnx2torch.node_converters.registry import get_converter

    opsets = {entry.domain: entry.version for entry in model.opset_import}
    unsupported: dict[str, list[str]] = {}
    for node in model.graph.node:
        try:
            get_converter(node.op_type, opsets.get(node.domain, 1), node.domain)
        except NotImplementedError:
            unsupported.setdefault(f"{node.domain + '.' if node.domain else ''}{node.op_type}", []).append(node.name)
    return unsupported


def to_torch(model: onnx.ModelProto):
    """onnx2torch conversion, in eval mode; every unsupported op is listed in one error."""
    from onnx2torch import convert

    unsupported = _unsupported_ops(model)
    if unsupported:
        listed = "; ".join(f"{op} x{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for op, names in unsupported.items())
        raise UserError(
            f"onnx2torch cannot convert these ops at opset {_default_opset(model)}: {listed}. "
            "Try re-exporting the model at opset 13 or 17, or target a node before them with --node."
        )
    # onnx2torch's Slice indexes with a list, which torch deprecates with a warning at every forward pass;
    # the result is still right (every conversion is checked against onnxruntime)
    warnings.filterwarnings("ignore", "Using a non-tuple sequence for multidimensional indexing", UserWarning)
    try:
        return convert(model).eval()
    except Exception as error:
        raise UserError(f"onnx2torch failed to convert the model: {type(error).__name__}: {error}") from None


# ------------------------------------------------------------------------------ checking the conversion


def sample_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded input per graph input, batch (and any other free dimension) 1: normal floats, zero integers."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in real_inputs(model):
        shape = [size if isinstance(size, int) else 1 for size in info.shape]
        values = rng.standard_normal(shape) if info.is_float else np.zeros(shape)
        feeds[info.name] = values.astype(info.dtype)
    return feeds


def check_against_onnxruntime(loaded: LoadedModel, module, seed: int = 0) -> float:
    """Run `module` (the converted repaired model) and onnxruntime on the unchanged model on one seeded input;
    returns the largest absolute difference over the outputs, or raises naming the first one that diverges."""
    import torch

    from onnxproxy.validate import exposing, session

    feeds = sample_inputs(loaded.repaired, seed)
    names = [output.name for output in loaded.outputs]
    expected = session(exposing(loaded.original, names)).run(names, feeds)
    with torch.no_grad():
        actual = module(*(torch.from_numpy(array) for array in feeds.values()))
    actual = list(actual) if isinstance(actual, (list, tuple)) else [actual]
    largest = 0.0
    for name, torch_value, runtime_value in zip(names, actual, expected):
        torch_value = torch_value.detach().cpu().numpy()
        if torch_value.shape != runtime_value.shape:
            raise UserError(f"the torch conversion gives output '{name}' the shape {list(torch_value.shape)}, "
                            f"onnxruntime {list(runtime_value.shape)}")
        difference = np.abs(torch_value.astype(np.float64) - runtime_value.astype(np.float64))
        if not np.isclose(torch_value, runtime_value, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, equal_nan=True).all():
            raise UserError(f"the torch conversion differs from onnxruntime at output '{name}': max abs diff "
                            f"{np.nanmax(difference):.3g} (atol {DEFAULT_ATOL}, rtol {DEFAULT_RTOL})")
        largest = max(largest, float(np.nanmax(difference, initial=0.0)))
    return largest


def convert_checked(loaded: LoadedModel):
    """The repaired model as a torch module in eval mode, checked once against onnxruntime."""
    module = to_torch(loaded.repaired)
    check_against_onnxruntime(loaded, module)
    return module
