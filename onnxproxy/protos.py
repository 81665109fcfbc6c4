"""Small helpers over onnx's protobuf messages, shared by reading a graph (graph.py) and repairing it
(repair.py): copying, attributes, node lists, opsets, graph order and tensor shapes."""

from __future__ import annotations

import heapq

import onnx
from onnx import helper

from onnxproxy.errors import UserError

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def attributes(node) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def drop_attributes(node, *names):
    kept = [attribute for attribute in node.attribute if attribute.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


def replace_nodes(graph, nodes):
    copies = [copy(node) for node in nodes]  # copied before the repeated field they live in is cleared
    del graph.node[:]
    graph.node.extend(copies)


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), 1)


def topological_order(graph) -> list[int]:
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


def value_shape(value) -> list:
    """A ValueInfo's shape: ints for known dimensions, strings or None for free ones."""
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in value.type.tensor_type.shape.dim]


def value_dtype(value) -> str:
    """A ValueInfo's numpy dtype name, or 'unknown'."""
    elem_type = value.type.tensor_type.elem_type
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "unknown"


def shapes_by_tensor(graph) -> dict[str, list]:
    """The known shape of every initializer and every tensor with shape information."""
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    for value in list(graph.value_info) + list(graph.output) + list(graph.input):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = value_shape(value)
    return shapes
