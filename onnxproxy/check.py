"""`onnxproxy check`, the CI gate: does onnxproxy read the model, does its torch conversion compute what
onnxruntime computes on the unchanged model tensor by tensor, and does the proxy graph keep the forward pass
and let gradients reach the input.

The result is a list of checks, rendered Polygraphy-style as text, as a JSON document and as JUnit XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from onnxproxy import run, validate
from onnxproxy.report import json_number, write_json
from onnxproxy.errors import UserError
from onnxproxy.graph import LoadedModel, TensorInfo, load_model, resolve_node, to_torch
from onnxproxy.proxy import DOMAIN, build_proxy, count_dual_slope_nodes
from onnxproxy.settings import DEFAULT_ATOL, DEFAULT_RTOL, DEFAULT_BACKWARD_SLOPE, Settings


@dataclass
class CheckOptions:
    outputs: str = "all"  # final, all, rectifiers, or NAME,NAME,...
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    tolerances: tuple[str, ...] = ()  # NAME:ATOL
    seed: int = 0
    val_range: tuple[float, float] = Settings.input_range
    batch: int = 4
    inputs_file: Path | None = None
    input_shapes: dict = field(default_factory=dict)
    input_name: str | None = None


# ------------------------------------------------------------------------------------------ report model


@dataclass
class Check:
    """A check of the whole model (it loads, converts, keeps the forward pass, ...)."""

    name: str
    passed: bool
    message: str

    def lines(self) -> list[str]:
        return [f"{_status(self.passed)} | {self.name} | {self.message}"]

    def record(self) -> dict:
        return {"name": self.name, "passed": self.passed, "message": self.message}


@dataclass
class Difference:
    """How far torch's values are from onnxruntime's, Polygraphy's statistics."""

    max_abs: float
    max_abs_at: list[int]
    mean_abs: float
    max_rel: float
    max_rel_at: list[int]
    mean_rel: float

    def record(self) -> dict:
        return {"max_abs_diff": json_number(self.max_abs), "max_abs_diff_at": self.max_abs_at,
                "mean_abs_diff": json_number(self.mean_abs), "max_rel_diff": json_number(self.max_rel),
                "max_rel_diff_at": self.max_rel_at, "mean_rel_diff": json_number(self.mean_rel)}


@dataclass
class TensorCheck:
    """One tensor compared between the torch module and onnxruntime on the unchanged model."""

    tensor: str
    node: str
    op_type: str
    shape: list[int]
    atol: float
    rtol: float
    passed: bool
    difference: Difference | None  # None when the shapes differ
    problem: str = ""

    @property
    def name(self) -> str:
        return f"tensor {self.tensor}"

    @property
    def message(self) -> str:
        if self.problem:
            return self.problem
        verdict = "within" if self.passed else "exceeds"
        return f"difference {verdict} tolerance (atol={self.atol:g}, rtol={self.rtol:g})"

    def lines(self) -> list[str]:
        lines = [f"Tensor '{self.tensor}' | node {self.node} ({self.op_type}) | shape {self.shape}"]
        if self.difference is not None:
            difference = self.difference
            lines += [f"    Absolute difference | max={difference.max_abs:.4g} at {tuple(difference.max_abs_at)}, "
                      f"mean={difference.mean_abs:.4g}",
                      f"    Relative difference | max={difference.max_rel:.4g} at {tuple(difference.max_rel_at)}, "
                      f"mean={difference.mean_rel:.4g}"]
        return lines + [f"    {_status(self.passed)} | {self.name} | {self.message}"]

    def record(self) -> dict:
        record = {"name": self.name, "passed": self.passed, "message": self.message, "tensor": self.tensor,
                  "node": self.node, "op_type": self.op_type, "shape": self.shape, "atol": self.atol,
                  "rtol": self.rtol}
        return record | (self.difference.record() if self.difference else {})


@dataclass
class Report:
    model: Path
    inputs: dict | None  # how the inputs were made; None when the model did not load
    checks: list = field(default_factory=list)  # Check and TensorCheck, in the order they ran

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> int:
        return sum(not check.passed for check in self.checks)

    @property
    def mismatched(self) -> list[str]:
        """Tensors that failed, in graph order: the first is the likely root cause."""
        return [check.tensor for check in self.checks if isinstance(check, TensorCheck) and not check.passed]

    def summary(self) -> str:
        return (f"{_status(self.passed)} | {len(self.checks)} checks: {len(self.checks) - self.failures} passed, "
                f"{self.failures} failed")

    def lines(self) -> list[str]:
        header = f"onnxproxy check {self.model}"
        lines = [f"{header} | inputs {_describe_inputs(self.inputs)}" if self.inputs else header]
        for check in self.checks:
            lines += check.lines()
        if self.mismatched:
            lines.append("FAILED | mismatched tensors in graph order (the first is the likely root cause): "
                         + ", ".join(self.mismatched))
        return lines + [self.summary()]

    def document(self) -> dict:
        return {"model": str(self.model), "passed": self.passed,
                "counts": {"checks": len(self.checks), "passed": len(self.checks) - self.failures,
                           "failed": self.failures},
                "inputs": self.inputs, "checks": [check.record() for check in self.checks],
                "mismatched": self.mismatched, "versions": run.versions()}

    def write_json(self, path: Path) -> None:
        write_json(path, self.document())

    def write_junit(self, path: Path) -> None:
        """One testcase per check, so CI systems list them with their failures."""
        counts = {"tests": str(len(self.checks)), "failures": str(self.failures), "errors": "0"}
        suites = ElementTree.Element("testsuites", counts)
        suite = ElementTree.SubElement(suites, "testsuite", {"name": f"onnxproxy check {self.model}", **counts})
        for check in self.checks:
            case = ElementTree.SubElement(suite, "testcase", {"classname": f"onnxproxy.check.{self.model.stem}",
                                                              "name": check.name})
            if not check.passed:
                failure = ElementTree.SubElement(case, "failure", {"message": check.message})
                failure.text = "\n".join(check.lines())
        ElementTree.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def _status(passed: bool) -> str:
    return "PASSED" if passed else "FAILED"


def _describe_inputs(inputs: dict) -> str:
    source = inputs.get("file") or f"uniform {inputs['val_range']} seed {inputs['seed']}"
    return f"'{inputs['name']}' {inputs['shape']} from {source}"


# ------------------------------------------------------------------------------------------- comparing


def within_tolerance(actual: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> tuple[Difference, bool]:
    """Polygraphy's statistics and its elementwise criterion: every value has
    |actual - reference| <= atol + rtol * |reference|, or equals it outright (same infinity, both NaN)."""
    actual, reference = actual.astype(np.float64), reference.astype(np.float64)
    identical = (actual == reference) | (np.isnan(actual) & np.isnan(reference))
    magnitude = np.abs(reference)
    with np.errstate(invalid="ignore"):
        absolute = _nan_as_inf(np.where(identical, 0.0, np.abs(actual - reference)))
        relative = _nan_as_inf(np.divide(absolute, magnitude, out=np.where(absolute == 0, 0.0, np.inf),
                                         where=magnitude > 0))
    difference = Difference(_max(absolute), _argmax(absolute), _mean(absolute),
                            _max(relative), _argmax(relative), _mean(relative))
    return difference, bool(validate.close(actual, reference, atol, rtol).all())


def _nan_as_inf(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), np.inf, values)


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else 0.0


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def _argmax(values: np.ndarray) -> list[int]:
    return [int(i) for i in np.unravel_index(values.argmax(), values.shape)] if values.size else []


# ---------------------------------------------------------------------------------------------- inputs


def make_inputs(model_input: TensorInfo, options: CheckOptions) -> tuple[np.ndarray, dict]:
    """The inputs every runner sees, and how they were made."""
    shape = list(model_input.shape[1:])
    description = {"name": model_input.name}
    if options.inputs_file is not None:
        inputs = _load_inputs(options.inputs_file, model_input)
        description["file"] = str(options.inputs_file)
    else:
        low, high = options.val_range
        if not low < high:
            raise UserError(f"--val-range LO HI needs LO < HI, got {low:g} {high:g}")
        inputs = np.random.default_rng(options.seed).uniform(low, high, [options.batch] + shape)
        description |= {"seed": options.seed, "val_range": [low, high]}
    description["shape"] = [len(inputs)] + shape
    return inputs.astype(model_input.dtype), description


def _load_inputs(path: Path, model_input: TensorInfo) -> np.ndarray:
    try:
        arrays = np.load(path)
    except Exception as error:  # numpy raises OSError, ValueError or BadZipFile by what is wrong
        raise UserError(f"--load-inputs {path}: not a readable .npz file ({type(error).__name__})") from None
    with arrays:
        if model_input.name in arrays.files:
            array = arrays[model_input.name]
        elif len(arrays.files) == 1:
            array = arrays[arrays.files[0]]
        else:
            raise UserError(f"--load-inputs {path}: no array named '{model_input.name}' "
                            f"among {', '.join(arrays.files)}")
    if list(array.shape[1:]) != list(model_input.shape[1:]) or not len(array):
        raise UserError(f"--load-inputs {path}: array of shape {list(array.shape)}, the model's input "
                        f"'{model_input.name}' takes [N, {', '.join(map(str, model_input.shape[1:]))}]")
    return array


def _rows_per_run(model_input: TensorInfo, rows: int) -> int:
    """Models exported with a fixed batch size (often 1) run that many rows at a time."""
    fixed = model_input.shape[0] if model_input.shape else None
    if not isinstance(fixed, int) or fixed <= 0:
        return rows
    if rows % fixed:
        raise UserError(f"the model's batch size is fixed at {fixed}: give a multiple of it ({rows} rows given)")
    return fixed


def _run_in_chunks(run_rows, inputs: np.ndarray, rows_per_run: int) -> dict[str, np.ndarray]:
    chunks = [run_rows(inputs[start:start + rows_per_run]) for start in range(0, len(inputs), rows_per_run)]
    return {name: np.concatenate([np.atleast_1d(chunk[name]) for chunk in chunks]) for name in chunks[0]}


def _as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _torch_runner(module, names: list[str]):
    def run_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = _as_tuple(module(torch.from_numpy(rows)))
        return {name: torch.as_tensor(value).numpy() for name, value in zip(names, outputs)}

    return run_rows


def _runtime_runner(model: onnx.ModelProto, input_name: str, names: list[str]):
    runtime = validate.session(validate.exposing(model, names))
    return lambda rows: dict(zip(names, runtime.run(names, {input_name: rows})))


# --------------------------------------------------------------------------------------- which tensors


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Every tensor a node writes, in graph order, with its node."""
    return {name: node for node in model.graph.node for name in node.output if name}


def _final_outputs(model: onnx.ModelProto) -> list[str]:
    return [value.name for value in model.graph.output]


def select_tensors(model: LoadedModel, outputs: str) -> list[str]:
    """The tensors `--outputs` names (comma-separated keywords and names), in graph order, among those both
    graphs compute: the repair keeps names, and a tensor it added or removed is skipped."""
    in_both = [name for name in _producers(model.repaired) if name in _producers(model.original)]
    keywords = {"all": set(in_both), "final": set(_final_outputs(model.repaired)),
                "rectifiers": {node.output for node in model.nodes if node.rectifier}}
    wanted = set()
    for part in filter(None, (part.strip() for part in outputs.split(","))):
        wanted |= keywords[part] if part in keywords else {resolve_tensor(model, part, "--outputs")}
    return [name for name in in_both if name in wanted]


def resolve_tensor(model: LoadedModel, name: str, option: str) -> str:
    """A tensor name as is, else a node (by the `--node` rules) standing for its first output."""
    if name in _producers(model.repaired):
        return name
    return resolve_node(model, name, option).output


def tensor_tolerances(model: LoadedModel, specs) -> dict[str, float]:
    """`--tol NAME:ATOL` options as {tensor: atol}."""
    tolerances = {}
    for spec in specs:
        name, _, value = spec.rpartition(":")  # tensor names may contain ':' (e.g. TensorFlow's x:0)
        try:
            atol = float(value)
        except ValueError:
            raise UserError(f"--tol {spec}: expected NAME:ATOL, e.g. conv1:1e-3") from None
        if not name or not atol >= 0:
            raise UserError(f"--tol {spec}: expected NAME:ATOL with ATOL >= 0")
        tolerances[resolve_tensor(model, name, "--tol")] = atol
    return tolerances


# ---------------------------------------------------------------------------------------------- checks


def run_checks(path: Path, options: CheckOptions) -> Report:
    """Every check, in the order the data meets them; checks that need a failed one's result are not run."""
    try:
        model = load_model(path, options.input_shapes, options.input_name)
    except UserError as error:
        return Report(Path(path), None, [Check("load", False, str(error))])
    tensors = select_tensors(model, options.outputs)
    tolerances = tensor_tolerances(model, options.tolerances)
    inputs, description = make_inputs(model.input, options)
    report = Report(Path(path), description, [_load_check(model)])
    rows_per_run = _rows_per_run(model.input, len(inputs))
    proxy_model, rectifier_check = _rectifier_check(model)
    report.checks.append(rectifier_check)
    producers, finals = _producers(model.repaired), _final_outputs(model.repaired)
    exposed = [name for name in producers if name in tensors or name in finals]
    module = _convert(validate.exposing(model.repaired, exposed), "convert", report)
    runtime_values = _run(report, "onnxruntime", "the unchanged model in onnxruntime",
                          lambda: _runtime_runner(model.original, model.input.name, exposed), inputs, rows_per_run)
    if module is None or runtime_values is None:
        return report
    torch_values = _run(report, "torch", "the converted torch module", lambda: _torch_runner(module, exposed),
                        inputs, rows_per_run)
    if torch_values is None:
        return report
    proxy_module = _convert(proxy_model, "convert proxy", report)
    if proxy_module is not None:
        proxy_values = _run_in_chunks(_torch_runner(proxy_module, finals), inputs, rows_per_run)
        report.checks.append(_proxy_forward_check(
            [_tensor_check(producers[name], name, proxy_values[name], torch_values[name], options.atol, options.rtol)
             for name in finals]))
        report.checks.append(_gradient_check(proxy_module, inputs[:rows_per_run]))
    report.checks += [_tensor_check(producers[name], name, torch_values[name], runtime_values[name],
                                    tolerances.get(name, options.atol), options.rtol)
                      for name in tensors if np.issubdtype(runtime_values[name].dtype, np.floating)]
    return report


def _load_check(model: LoadedModel) -> Check:
    repairs = "; ".join(model.repairs) or "none needed"
    try:
        onnx.checker.check_model(model.repaired, full_check=True)
    except onnx.checker.ValidationError as error:
        return Check("load", False, f"the repaired model fails onnx.checker: {error} (repairs: {repairs})")
    return Check("load", True, f"the repaired model passes onnx.checker (repairs: {repairs})")


def _rectifier_check(model: LoadedModel) -> tuple[onnx.ModelProto, Check]:
    proxy_model, rewritten = build_proxy(model.repaired, DEFAULT_BACKWARD_SLOPE)
    rectifiers = [node for node in model.nodes if node.rectifier]
    count = count_dual_slope_nodes(proxy_model)
    kinds = ", ".join(f"{op} x{n}" for op, n in sorted(rewritten.items())) or "the model has none"
    if count == len(rectifiers):
        return proxy_model, Check("rectifiers rewritten", True, f"{count} of {len(rectifiers)} ({kinds})")
    # build_proxy rewrites nodes in place, so a node keeps its index
    left = [node.name for node in rectifiers if proxy_model.graph.node[node.index].domain != DOMAIN]
    return proxy_model, Check("rectifiers rewritten", False,
                              f"{count} of {len(rectifiers)} rewritten; not rewritten: {', '.join(left)}")


def _convert(model: onnx.ModelProto, name: str, report: Report):
    """The onnx2torch module, or None with a failed check naming the unsupported nodes."""
    try:
        module = to_torch(model)
    except UserError as error:
        report.checks.append(Check(name, False, str(error)))
        return None
    report.checks.append(Check(name, True, "onnx2torch converted every node"))
    return module


def _run(report: Report, name: str, what: str, make_runner, inputs: np.ndarray, rows_per_run: int):
    """Every exposed tensor's values, or None with a failed check."""
    try:
        values = _run_in_chunks(make_runner(), inputs, rows_per_run)
    except Exception as error:  # whatever stops a runtime on this model is the check's finding
        report.checks.append(Check(name, False, f"{what} fails: {type(error).__name__}: {error}"))
        return None
    report.checks.append(Check(name, True, f"{what} runs"))
    return values


def _tensor_check(node: onnx.NodeProto, tensor: str, actual: np.ndarray, reference: np.ndarray,
                  atol: float, rtol: float) -> TensorCheck:
    shape = list(reference.shape)
    if actual.shape != reference.shape:
        return TensorCheck(tensor, node.name, node.op_type, shape, atol, rtol, False, None,
                           f"shapes differ: torch {list(actual.shape)}, onnxruntime {shape}")
    difference, passed = within_tolerance(actual, reference, atol, rtol)
    return TensorCheck(tensor, node.name, node.op_type, shape, atol, rtol, passed, difference)


def _proxy_forward_check(outputs: list[TensorCheck]) -> Check:
    """The proxy graph's forward pass must be the original network's: its final outputs against the plain
    conversion's, both in torch."""
    changed = [output.tensor for output in outputs if not output.passed]
    largest = max((output.difference.max_abs for output in outputs if output.difference), default=0.0)
    detail = f"max abs diff {largest:.4g}, atol={outputs[0].atol:g}, rtol={outputs[0].rtol:g}"
    if changed:
        return Check("proxy forward", False, f"the proxy graph changes outputs {', '.join(changed)} ({detail})")
    return Check("proxy forward", True, f"the proxy graph's outputs equal the original's ({detail})")


def _gradient_check(proxy_module, rows: np.ndarray) -> Check:
    x = torch.from_numpy(rows).requires_grad_(True)
    outputs = [output for output in _as_tuple(proxy_module(x)) if output.requires_grad]
    if not outputs:
        return Check("gradient flow", False, "no output of the proxy graph depends differentiably on the input")
    # A random positive combination of all output units: its gradient is zero only if every unit's is
    # (a plain sum would cancel out, e.g. over a Softmax, whose outputs sum to 1).
    generator = torch.Generator().manual_seed(0)
    combination = sum((output * torch.rand(output.shape, generator=generator)).sum() for output in outputs)
    (gradient,) = torch.autograd.grad(combination, x)
    share = float((gradient != 0).float().mean())
    if share == 0:
        return Check("gradient flow", False, "the input gradient through the proxy graph is zero everywhere "
                                             "(e.g. Sign or step activations): gradient ascent cannot move")
    return Check("gradient flow", True, f"nonzero input gradient through the proxy graph on {share:.0%} of input "
                                        f"values (backward slope {DEFAULT_BACKWARD_SLOPE})")
