"""`onnxproxy inspect`: what a model holds and what onnxproxy made of it, as a JSON-ready dict and as text."""

from __future__ import annotations

from collections import Counter

from onnxproxy import graph
from onnxproxy.errors import UserError


def build_report(loaded: graph.LoadedModel, node_spec: str | None = None) -> dict:
    """Inputs, outputs, every node (or only the one `node_spec` resolves to), op counts, opsets, producer,
    repairs, and whether the torch conversion matches onnxruntime."""
    original = loaded.original
    nodes = [graph.resolve_node(loaded, node_spec)] if node_spec else loaded.nodes
    return {
        "model": str(loaded.path),
        "producer": f"{original.producer_name} {original.producer_version}".strip(),
        "ir_version": original.ir_version,
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in original.opset_import},
        "input": loaded.input.name,
        "inputs": [_tensor(info) for info in graph.real_inputs(loaded.repaired)],
        "outputs": [_tensor(output) for output in loaded.outputs],
        "repairs": loaded.repairs,
        "op_counts": dict(Counter(node.op_type for node in loaded.nodes).most_common()),
        "rectifiers": sum(node.rectifier for node in loaded.nodes),
        "nodes": [_node(node) for node in nodes],
        "conversion": _conversion(loaded),
    }


def _tensor(info: graph.TensorInfo) -> dict:
    return {"name": info.name, "shape": info.shape, "dtype": info.dtype, "layout": info.layout}


def _node(node: graph.NodeInfo) -> dict:
    return {"index": node.index, "name": node.name, "op_type": node.op_type, "output": node.output,
            "shape": node.shape, "channels": node.channels, "rectifier": node.rectifier}


def _conversion(loaded: graph.LoadedModel) -> dict:
    try:
        module = graph.to_torch(loaded.repaired)
        return {"matches_onnxruntime": True, "max_abs_diff": graph.check_against_onnxruntime(loaded, module),
                "error": None}
    except UserError as error:
        return {"matches_onnxruntime": False, "max_abs_diff": None, "error": str(error)}


def render_text(report: dict) -> str:
    lines = [
        f"model      {report['model']}",
        f"producer   {report['producer'] or '-'}   IR {report['ir_version']}   opsets "
        + ", ".join(f"{domain} {version}" for domain, version in report["opsets"].items()),
    ]
    for label, tensors in (("input", report["inputs"]), ("output", report["outputs"])):
        for tensor in tensors:
            layout = f"  {tensor['layout']}" if tensor["layout"] != "-" else ""
            lines.append(f"{label:<10} {tensor['name']}  {_shape(tensor['shape'])}  {tensor['dtype']}{layout}")
    lines += [f"repair     {repair}" for repair in report["repairs"]] or ["repair     nothing needed"]
    lines.append("")
    lines += _node_table(report["nodes"])
    lines.append("")
    lines.append(f"{len(report['nodes'])} nodes, {report['rectifiers']} rectifiers (R) that the proxy graph rewrites")
    lines.append("ops: " + ", ".join(f"{op} {count}" for op, count in report["op_counts"].items()))
    conversion = report["conversion"]
    if conversion["matches_onnxruntime"]:
        lines.append(f"torch conversion matches onnxruntime (max abs diff {conversion['max_abs_diff']:.2g})")
    else:
        lines.append(f"torch conversion FAILED: {conversion['error']}")
    return "\n".join(lines)


def _node_table(nodes: list[dict]) -> list[str]:
    header = ("#", "op", "name", "output", "shape", "channels", "R")
    rows = [(str(node["index"]), node["op_type"], node["name"], node["output"], _shape(node["shape"]),
             "" if node["channels"] is None else str(node["channels"]), "R" if node["rectifier"] else "")
            for node in nodes]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def _shape(shape: list) -> str:
    return "[" + ", ".join("?" if size is None else str(size) for size in shape) + "]"
