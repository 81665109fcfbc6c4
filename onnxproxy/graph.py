"""Loading an ONNX classifier: read it safely, repair it for onnx2torch, inventory its nodes, resolve
`--node` names, cut the graph at a target tensor, and convert it to torch."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxproxy.errors import UserError

RECTIFIER_OPS = ("Relu", "LeakyRelu", "PRelu", "Clip")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


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


@dataclass
class NodeInfo:
    index: int
    name: str
    op_type: str
    output: str  # the node's first output tensor, the one `--node` targets
    shape: list
    rectifier: bool

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
        raise UserError(f"{path}: not a readable ONNX model ({type(error).__name__})") from None
    if not model.graph.node:
        raise UserError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    folder = path.resolve().parent
    for tensor in _external_tensors(model):
        location = dict((entry.key, entry.value) for entry in tensor.external_data).get("location", "")
        data_path = (folder / location).resolve()
        if folder not in data_path.parents:
            raise UserError(f"{path}: external data '{location}' points outside the model's folder; refusing it")
        if not data_path.is_file():
            raise UserError(f"{path}: external data file '{location}' is missing")
    if any(True for _ in _external_tensors(model)):
        onnx.load_external_data_for_model(model, str(folder))
    return model


def _external_tensors(model):
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


# --------------------------------------------------------------------------------------------- repairing


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a stable name `<OpType>_<index in graph order>`; returns how many."""
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


def _graph_sources(graph) -> set:
    return {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}


def _is_sorted(graph) -> bool:
    available = _graph_sources(graph)
    for node in graph.node:
        if not all(name in available for name in node.input):
            return False
        available.update(node.output)
    return True


def _topological_sort(model, repairs):
    graph = model.graph
    if _is_sorted(graph):
        return
    available = _graph_sources(graph)
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            missing = sorted({name for node in pending for name in node.input if name not in available})
            raise UserError(f"graph has a cycle or inputs nobody produces: {', '.join(missing[:5])}")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [node for node in pending if node not in ready]
    repairs.append("sorted nodes topologically")
    del graph.node[:]
    graph.node.extend(ordered)


def _constants_to_initializers(model, repairs):
    graph = model.graph
    kept = []
    moved = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _constant_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved += 1
                continue
        kept.append(node)
    if moved:
        repairs.append(f"turned {moved} Constant nodes into initializers")
        del graph.node[:]
        graph.node.extend(kept)


def _constant_value(node):
    attribute = node.attribute[0]
    if attribute.name == "value":
        return numpy_helper.to_array(attribute.t)
    scalars = {"value_float": np.float32, "value_int": np.int64}
    lists = {"value_floats": np.float32, "value_ints": np.int64}
    if attribute.name in scalars:
        return np.array(helper.get_attribute_value(attribute), dtype=scalars[attribute.name])
    if attribute.name in lists:
        return np.array(helper.get_attribute_value(attribute), dtype=lists[attribute.name])
    return None


_CONVERTIBLE_OPSETS = range(9, 18)  # opsets whose op revisions onnx2torch 1.5.15 converts after repair
_TARGET_OPSETS = (13, 17)


def _default_opset(model) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)


def _convert_opset(model, repairs):
    opset = _default_opset(model)
    if opset in _CONVERTIBLE_OPSETS and opset >= 13:
        return model
    errors = []
    for target in _TARGET_OPSETS:
        try:
            converted = onnx.version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises RuntimeError/ConvertError/IndexError by op
            errors.append(f"{target}: {error}")
            continue
        repairs.append(f"converted opset {opset} -> {target}")
        return converted
    raise UserError(f"cannot convert opset {opset} to one onnx2torch supports ({'; '.join(errors)})")


def _apply_input_shapes(model, input_shapes, repairs):
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = input_shapes[value.name]
            shape = value.type.tensor_type.shape
            if len(shape.dim) != len(dims):
                raise UserError(f"--input-shape {value.name}: model input has {len(shape.dim)} dimensions, got {len(dims)}")
            for dim, size in zip(list(shape.dim)[1:], dims[1:]):
                dim.Clear()
                dim.dim_value = size
            repairs.append(f"fixed input shape {value.name} to {dims}")


def _check_free_dimensions(input_info: TensorInfo):
    for axis, size in enumerate(input_info.shape[1:], start=1):
        if not isinstance(size, int):
            raise UserError(
                f"input '{input_info.name}' has free dimension {axis} ('{size}'): "
                f"give it with --input-shape {input_info.name}:D1,D2,..."
            )


def repair(model: onnx.ModelProto, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Apply only the fixes this model needs for onnx2torch; returns the repaired copy and what was done."""
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    repairs: list[str] = []
    if repaired.ir_version < 4:
        repaired.ir_version = 4
    _drop_initializer_inputs(repaired, repairs)
    _apply_input_shapes(repaired, input_shapes or {}, repairs)
    _topological_sort(repaired, repairs)
    _constants_to_initializers(repaired, repairs)
    repaired = _convert_opset(repaired, repairs)
    repaired = onnx.shape_inference.infer_shapes(repaired, data_prop=True)
    return repaired, repairs


# -------------------------------------------------------------------------------------------- inventory


def _tensor_info(value) -> TensorInfo:
    tensor_type = value.type.tensor_type
    shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim]
    return TensorInfo(value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
                      if tensor_type.elem_type else "unknown")


def _is_rectifier(node, initializers) -> bool:
    if node.op_type in ("Relu", "LeakyRelu", "PRelu"):
        return True
    if node.op_type == "Clip":
        return clip_bounds(node, initializers)[0] == 0.0
    return False


def clip_bounds(node, initializers) -> tuple[float | None, float | None]:
    """Clip's (min, max) as floats where they are constants (attributes before opset 11, inputs after)."""
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    if "min" in attributes or "max" in attributes:
        return attributes.get("min"), attributes.get("max")
    bounds = []
    for position in (1, 2):
        name = node.input[position] if len(node.input) > position else ""
        bounds.append(float(numpy_helper.to_array(initializers[name])) if name in initializers else None)
    return tuple(bounds)


def inventory(model: onnx.ModelProto) -> list[NodeInfo]:
    graph = model.graph
    shapes = {value.name: _tensor_info(value).shape for value in
              list(graph.value_info) + list(graph.output) + list(graph.input)}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    return [
        NodeInfo(index, node.name, node.op_type, node.output[0], shapes.get(node.output[0], []),
                 _is_rectifier(node, initializers))
        for index, node in enumerate(graph.node)
    ]


def _select_input(model, input_name) -> TensorInfo:
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [_tensor_info(value) for value in model.graph.input if value.name not in initializers]
    float_inputs = [info for info in inputs if info.dtype in ("float32", "float64", "float16")]
    if input_name is not None:
        chosen = [info for info in inputs if info.name == input_name]
        if not chosen:
            raise UserError(f"--input {input_name}: no such input; the model has {', '.join(i.name for i in inputs)}")
        return chosen[0]
    if not float_inputs:
        raise UserError("the model has no float input; onnxproxy optimizes a float input tensor")
    if len(inputs) > 1:
        raise UserError(f"the model has several inputs ({', '.join(i.name for i in inputs)}): choose one with --input")
    return float_inputs[0]


def load_model(path, input_shapes: dict | None = None, input_name: str | None = None) -> LoadedModel:
    """Read, name, repair and inventory a model. `input_shapes` maps input names to full shapes."""
    original = read_model(path)
    name_unnamed_nodes(original)
    try:
        repaired, repairs = repair(original, input_shapes)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{path}: cannot repair the model for conversion: {error}") from None
    model_input = _select_input(repaired, input_name)
    _check_free_dimensions(model_input)
    outputs = [_tensor_info(value) for value in repaired.graph.output]
    return LoadedModel(Path(path), original, repaired, model_input, outputs, inventory(repaired), repairs)


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


def resolve_node(model: LoadedModel, spec: str) -> NodeInfo:
    """`--node X`: an ONNX node name, then an output tensor name, then an unambiguous case-insensitive
    suffix or substring of one."""
    for matches in (
        [node for node in model.nodes if node.name == spec],
        [node for node in model.nodes if spec in node_outputs(model, node)],
    ):
        if matches:
            return matches[0]
    lowered = spec.lower()
    for predicate in (str.endswith, str.__contains__):
        matches = [node for node in model.nodes if predicate(node.name.lower(), lowered) or predicate(node.output.lower(), lowered)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(node.name for node in matches[:8])
            raise UserError(f"--node {spec} is ambiguous: it matches {listed}. Run `onnxproxy inspect MODEL` for all names.")
    names = [node.name for node in model.nodes] + [node.output for node in model.nodes]
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UserError(f"--node {spec}: no such node or tensor.{hint} Run `onnxproxy inspect MODEL` for all names.")


def node_outputs(model: LoadedModel, node: NodeInfo) -> list[str]:
    return list(model.repaired.graph.node[node.index].output)


# ---------------------------------------------------------------------------------------- cut & convert


def cut_at(model: onnx.ModelProto, input_name: str, tensor: str) -> onnx.ModelProto:
    """The part of the graph that computes `tensor` from `input_name`, as its own model."""
    extracted = onnx.utils.Extractor(model).extract_model([input_name], [tensor])
    extracted.opset_import.extend(
        entry for entry in model.opset_import if entry.domain not in {e.domain for e in extracted.opset_import}
    )
    if input_name not in {value.name for value in extracted.graph.input}:
        raise UserError(f"tensor '{tensor}' does not depend on the input '{input_name}'")
    return extracted


def to_torch(model: onnx.ModelProto):
    """onnx2torch conversion, in eval mode; every unsupported op is listed in one error."""
    from onnx2torch import convert
    from onnx2torch.node_converters.registry import get_converter

    opsets = {entry.domain: entry.version for entry in model.opset_import}
    unsupported: dict[str, list[str]] = {}
    for node in model.graph.node:
        try:
            get_converter(node.op_type, opsets.get(node.domain, 1), node.domain)
        except NotImplementedError:
            unsupported.setdefault(f"{node.domain + '.' if node.domain else ''}{node.op_type}", []).append(node.name)
    if unsupported:
        listed = "; ".join(f"{op} x{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for op, names in unsupported.items())
        raise UserError(
            f"onnx2torch cannot convert these ops at opset {opsets.get('', '?')}: {listed}. "
            "Try re-exporting the model at opset 13 or 17, or cutting it before those nodes with --node."
        )
    try:
        return convert(model).eval()
    except Exception as error:
        raise UserError(f"onnx2torch failed to convert the model: {type(error).__name__}: {error}") from None
