"""Loading an ONNX classifier: read it safely, have repair.py fix it for onnx2torch, inventory its nodes
(which are rectifiers, which are the logits), resolve `--node` names, cut the graph at a target tensor,
convert it to torch and check the conversion."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxproxy import protos
from onnxproxy.errors import UserError
from onnxproxy.repair import repair
from onnxproxy.settings import DEFAULT_ATOL, DEFAULT_RTOL

RECTIFIER_OPS = ("Relu", "LeakyRelu", "PRelu", "Clip")  # the ops is_rectifier accepts, in their usual order
SOFTMAX_OPS = ("Softmax", "LogSoftmax")


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
        return self.dtype in protos.FLOAT_DTYPES


@dataclass
class NodeInfo:
    index: int  # position in graph order (the original nodes, topologically sorted)
    name: str
    op_type: str
    output: str  # the node's first output tensor, the one `--node` targets
    shape: list  # [] for scalars and where unknown (outputs the repair pass cut away, non-tensor outputs)
    rectifier: bool
    outputs: list = field(default_factory=list)  # all its output tensors
    inputs: list = field(default_factory=list)  # its input tensors ('' for an optional one left out)

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


# -------------------------------------------------------------------------------------------- inventory


def _tensor_info(value) -> TensorInfo:
    return TensorInfo(value.name, protos.value_shape(value), protos.value_dtype(value))


def is_rectifier(node: onnx.NodeProto, initializers: dict) -> bool:
    """Whether the proxy graph rewrites `node` (`initializers`: the constants by name): a Relu, a LeakyRelu, a
    PRelu with a constant slope, or a Clip with a constant min 0 and a constant max or none, in the default
    domain. The dual-slope op's converter needs those slopes and bounds as constants."""
    if node.op_type not in RECTIFIER_OPS or node.domain not in protos.DEFAULT_DOMAINS:
        return False
    if node.op_type == "PRelu":
        return node.input[1] in initializers
    if node.op_type == "Clip":
        lower, upper = clip_bounds(node, initializers)
        has_max = len(node.input) > 2 and node.input[2] != ""
        return lower == 0.0 and (upper is not None or not has_max)
    return True


def clip_bounds(node, initializers) -> tuple[float | None, float | None]:
    """Clip's (min, max) as floats where they are constants (attributes before opset 11, inputs after)."""
    attributes = protos.attributes(node)
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
    shapes = protos.shapes_by_tensor(repaired.graph)
    initializers = {tensor.name: tensor for tensor in repaired.graph.initializer}
    graph = original.graph
    return [
        NodeInfo(index, node.name, node.op_type, node.output[0], shapes.get(node.output[0], []),
                 is_rectifier(node, initializers), list(node.output), list(node.input))
        for index, node in enumerate(graph.node[position] for position in protos.topological_order(graph))
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


def resolve_node(model: LoadedModel, spec: str, option: str = "--node") -> NodeInfo:
    """`--node X`: an ONNX node name, then an output tensor name, then an unambiguous case-insensitive
    suffix or substring of one. `option` names the option in the error messages."""
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
            raise UserError(f"{option} {spec} is ambiguous: it matches {len(matches)} nodes ({listed}). "
                            f"{_INSPECT_HINT}")
    names = dict.fromkeys([node.name for node in model.nodes] + [node.output for node in model.nodes])
    close = difflib.get_close_matches(spec, list(names), n=5, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UserError(f"{option} {spec}: no such node or tensor.{hint} {_INSPECT_HINT}")


def logits_node(model: LoadedModel) -> NodeInfo:
    """The node computing the logits: the producer of the model's (first) output, or where that is a final
    Softmax or LogSoftmax, the producer of its input."""
    producers = {node.output: node for node in model.nodes}
    output = model.outputs[0].name
    node = producers.get(output)
    if node is not None and node.op_type in SOFTMAX_OPS:
        node = producers.get(node.inputs[0])
    if node is None:
        raise UserError(f"no node computes the logits behind the model's output '{output}'")
    return node


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
            f"onnx2torch cannot convert these ops at opset {protos.default_opset(model)}: {listed}. "
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

    from onnxproxy.validate import close, exposing, session

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
        if not close(torch_value, runtime_value).all():
            raise UserError(f"the torch conversion differs from onnxruntime at output '{name}': max abs diff "
                            f"{np.nanmax(difference):.3g} (atol {DEFAULT_ATOL}, rtol {DEFAULT_RTOL})")
        largest = max(largest, float(np.nanmax(difference, initial=0.0)))
    return largest


def convert_checked(loaded: LoadedModel):
    """The repaired model as a torch module in eval mode, checked once against onnxruntime."""
    module = to_torch(loaded.repaired)
    check_against_onnxruntime(loaded, module)
    return module
