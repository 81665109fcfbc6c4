"""One `maximize` run, from the user's options to a validated results folder."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from onnxproxy import __version__, graph, report
from onnxproxy.errors import UserError
from onnxproxy.maximize import Target, UnitResult, maximize_units, optimizations, prepare_target, resolve_target
from onnxproxy.objectives import choose_objective, parse_units
from onnxproxy.settings import Settings

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
DEFAULT_NODE = "conv3"


@dataclass
class Request:
    model: Path | None
    node: str | None
    units: str | None
    objective: str | None
    position: tuple[int, ...] | None
    method: str
    settings: Settings
    out: Path | None
    force: bool
    quiet: bool
    input_shapes: dict
    input_name: str | None


def versions() -> dict:
    packages = ("torch", "onnx", "onnxruntime", "onnx2torch")
    return {"onnxproxy": __version__, **{name: metadata.version(name) for name in packages}}


def _default_out(model: graph.LoadedModel, node: graph.NodeInfo) -> Path:
    return Path("runs") / f"{model.name}-{report.safe_name(node.name)}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return device


def maximize(request: Request, warn) -> tuple[dict, Path]:
    """Runs the optimization, validates it and writes the folder; returns the results document and folder."""
    settings = request.settings
    settings.check()
    model_path = request.model or DEFAULT_MODEL
    if request.model is None and not model_path.exists():
        raise UserError(f"the default model {model_path} is missing; pass a MODEL")
    model = graph.load_model(model_path, request.input_shapes, request.input_name)
    node_spec = request.node or (DEFAULT_NODE if request.model is None else None)
    if node_spec is None:
        raise UserError("--node is required for a model other than the default one (see `onnxproxy inspect MODEL`)")
    node, units_spec = resolve_target(model, node_spec, request.units)
    if units_spec is None:
        warn(f"no unit given: maximizing unit 0 of {node.name} (use {node.name}:UNITS or --units)")
    out_dir = request.out or _default_out(model, node)
    report.check_out_dir(out_dir, request.force)
    target = prepare_target(model, node, settings.backward_slope, settings.device)
    objective = choose_objective(request.objective, target.shape, request.position)
    units = parse_units(units_spec, target.unit_count)
    _warn_about_target(target, warn)
    methods = ["vanilla", "proxygrad"] if request.method == "compare" else [request.method]
    show_progress = not request.quiet and sys.stdout.isatty()
    with tqdm(total=settings.steps * sum(optimizations(method, settings) for method in methods), desc=f"{node.name} x{len(units)} units", unit="step",
              disable=not show_progress, leave=False) as progress:
        results, zero_gradient = maximize_units(target, objective, units, methods, settings, progress)
    if zero_gradient:
        warn("the input gradient is exactly zero everywhere at the start: the optimizer cannot move "
             "(e.g. Sign or step activations); the reported values are those of the starting inputs")
    _warn_about_results(results, settings.seeds, warn)
    document = _document(request, model, target, objective, results, settings)
    with report.atomic_dir(out_dir) as folder:
        _write(folder, document, target, results, settings)
    return document, out_dir


def _warn_about_target(target: Target, warn):
    if target.after_softmax:
        warn(f"{target.node.name} is or comes after a Softmax: maximizing a probability; the logit before it "
             "is usually the better target")
    if not target.rewritten:
        warn("no rectifier before this target: ProxyGrad equals ordinary gradient ascent here")


def _warn_about_results(results: list[UnitResult], seeds: int, warn):
    for result in results:
        if result.status == "nonfinite":
            warn(f"unit {result.unit} ({result.method}): the activation is NaN or infinite from the start in "
                 "every seed; no input is reported for it")
        elif result.status == "stopped":
            warn(f"unit {result.unit} ({result.method}): the activation became NaN or infinite in "
                 f"{result.stopped_seeds} of {seeds} seeds; those stopped there, the best finite value is kept")


def _document(request: Request, model, target: Target, objective, results: list[UnitResult], settings) -> dict:
    options = {**asdict(settings), "method": request.method, "objective": objective.kind,
               "position": list(objective.position) if objective.position else None,
               "input_shapes": request.input_shapes, "input": model.input.name, "versions": versions()}
    document = {
        "model": str(model.path), "node": target.node.name, "tensor": target.tensor, "op_type": target.node.op_type,
        "tensor_shape": target.shape, "objective": objective.kind,
        "rectifiers_rewritten": target.rewritten, "settings": options,
        "results": [result.record() for result in results],
        "validated": _all_validated(results),
    }
    if request.method == "compare":
        document["comparison"] = comparison(results)
    return document


def _all_validated(results: list[UnitResult]) -> bool:
    """Every finite result agrees with onnxruntime, and there is at least one."""
    scored = [result.validated for result in results if result.status != "nonfinite"]
    return bool(scored) and all(scored)


def comparison(results: list[UnitResult]) -> list[dict]:
    """Per unit: vanilla and proxygrad validated activations side by side, with ProxyGrad's gain."""
    by_unit: dict[int, dict] = {}
    for result in results:
        by_unit.setdefault(result.unit, {})[result.method] = result.onnxruntime_activation
    rows = []
    for unit, values in by_unit.items():
        vanilla, proxygrad = values.get("vanilla"), values.get("proxygrad")
        gain = None if vanilla is None or proxygrad is None else proxygrad - vanilla
        rows.append({"unit": unit, "vanilla": vanilla, "proxygrad": proxygrad, "gain": gain})
    return rows


def _write(folder: Path, document: dict, target: Target, results: list[UnitResult], settings: Settings):
    layout = target.model.input.layout
    images, tiles, inputs = {}, [], {}
    for result in results:
        image = report.input_to_image(result.best_input, layout, settings.input_range)
        images[f"{result.key}.png"] = image
        inputs[result.key] = result.best_input
        value = "n/a" if result.onnxruntime_activation is None else f"{result.onnxruntime_activation:.3g}"
        tiles.append((image, f"{result.unit} {result.method}\n{value}"))
    report.write_results(folder, document, inputs, images, report.grid_image(tiles))


def summary_lines(document: dict) -> list[str]:
    """The human-readable table printed after a run."""
    lines = [f"{document['node']} ({document['tensor']}), objective {document['objective']}:"]
    for record in document["results"]:
        check = {True: "validated", False: "MISMATCH", None: record["status"]}[record["validated"]]
        value = _fmt(record["onnxruntime_activation"])
        lines.append(f"  unit {record['unit']:4d}  {record['method']:9s}  {value:>10}  "
                     f"(start {_fmt(record['initial_activation'])}, step {record['best_step']})  {check}")
    for row in document.get("comparison", []):
        if row["gain"] is not None:
            lines.append(f"  unit {row['unit']:4d}  proxygrad - vanilla = {row['gain']:+.4g}")
    return lines


def _fmt(value):
    return "n/a" if value is None else f"{value:.4g}"

