"""Activation maximization with ProxyGrad: prepare the cut proxy graph for a target, run the optimization
loop for many units and seeds as one batch, keep the best input per row by its true activation, and
validate the winners with onnxruntime on the unchanged model."""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from onnxproxy import graph, proxy, report
from onnxproxy.errors import UserError
from onnxproxy.objectives import Objective, looks_like_units
from onnxproxy.settings import Settings
from onnxproxy.validate import TensorScorer, agree

@dataclass
class Target:
    """A tensor to maximize units of, with the proxy module that computes it and nothing after it."""

    model: graph.LoadedModel
    node: graph.NodeInfo
    module: torch.nn.Module
    input_shape: list[int]  # without the batch axis
    shape: list[int]  # of the target tensor for a batch of one, as torch computes it
    rewritten: dict
    after_softmax: bool

    @property
    def tensor(self) -> str:
        return self.node.output

    @functools.cached_property
    def scorer(self) -> TensorScorer:
        """onnxruntime on the unchanged model, exposing this tensor: one session for all of the target's batches."""
        return TensorScorer(self.model.original, self.model.input.name, self.tensor)

    @property
    def unit_count(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else 1


def resolve_target(model: graph.LoadedModel, spec: str, units_option: str | None):
    """`NODE`, `NODE:UNITS` (Lucid's convention) or `--units`; a node name may itself contain ':'."""
    try:
        return graph.resolve_node(model, spec), units_option
    except UserError:
        head, _, tail = spec.rpartition(":")
        if not head or not looks_like_units(tail):
            raise
    if units_option:
        raise UserError(f"units given twice: in --node {spec} and --units {units_option}")
    return graph.resolve_node(model, head), tail


def prepare_target(model: graph.LoadedModel, node: graph.NodeInfo, backward_slope: float, device: str) -> Target:
    cut = graph.cut_at(model.repaired, model.input.name, node.output)
    after_softmax = any(n.op_type in graph.SOFTMAX_OPS for n in cut.graph.node)
    proxy_model, rewritten = proxy.build_proxy(cut, backward_slope)
    module = graph.to_torch(proxy_model).to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    input_shape = list(model.input.shape[1:])
    return Target(model, node, module, input_shape, _batched_shape(module, input_shape, node, device),
                  dict(rewritten), after_softmax)


def _batched_shape(module, input_shape: list[int], node: graph.NodeInfo, device: str) -> list[int]:
    """The target's shape for a batch of one, from torch (shape inference can leave it unknown), after checking
    that the graph computes a batch of inputs at once: units and seeds run as one batch."""
    with torch.no_grad():
        try:
            shape = list(_first_output(module(torch.zeros([2] + input_shape, device=device))).shape)
        except RuntimeError as error:
            raise UserError(f"the graph up to {node.name} cannot run a batch of inputs (an exporter fixed the batch "
                            f"size somewhere the repair pass does not free: {str(error).splitlines()[0]})") from None
    if shape[:1] != [2]:
        raise UserError(f"{node.name} does not keep the batch axis first (shape {shape} for a batch of 2)")
    return [1] + shape[1:]


@dataclass
class Trajectory:
    """Per batch row: the best input seen, its true activation, the step it was seen at, and the start."""

    best_inputs: np.ndarray
    best_values: np.ndarray
    best_steps: np.ndarray
    initial_values: np.ndarray
    stopped: np.ndarray  # rows stopped because their activation became NaN or infinite
    zero_gradient: bool  # the input gradient was exactly zero for every row at the start


PER_ROW_FIELDS = ("best_inputs", "best_values", "best_steps", "initial_values", "stopped")


def starting_inputs(shape: list[int], rows: int, settings: Settings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    low, high = settings.input_range
    return low + (high - low) * torch.rand([rows] + shape, generator=generator)


def slope_schedule(settings: Settings):
    """ProxyGrad's backward slope per step: constant, or ("decay") linear from the slope to 0 over the first half
    of the steps and the ordinary gradient after it (docs/benchmarks.md)."""
    if settings.slope_schedule == "constant":
        return lambda step: settings.backward_slope
    half = settings.steps / 2
    return lambda step: settings.backward_slope * (1 - step / half) if step < half else None


def optimize(target: Target, objective: Objective, row_units: list[int], start: torch.Tensor,
             settings: Settings, backward_slope, progress=None) -> Trajectory:
    """Gradient ascent from `start` on every row at once. backward_slope: None = ordinary gradients, a number,
    or a function of the step number.

    Every forward value is the original network's (the proxy only changes gradients), so the best input
    per row is kept by it. A row whose activation stops being finite (a NaN gradient leads there in one step)
    stops, keeping its best value so far; the others go on.
    """
    slope_at = backward_slope if callable(backward_slope) else lambda step: backward_slope
    x = start.clone().to(settings.device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr) if settings.optimizer == "adam" else None
    rows = x.shape[0]
    best_values = torch.full((rows,), -math.inf)
    best_inputs = start.clone()
    best_steps = torch.zeros(rows, dtype=torch.long)
    alive = torch.ones(rows, dtype=torch.bool)
    initial_values, zero_gradient = None, False
    slope = object()  # no slope yet: the first step always sets one
    for step in range(settings.steps + 1):
        if slope_at(step) != slope:
            slope = slope_at(step)
            proxy.set_backward_slope(target.module, slope)
        values = objective.values(_first_output(target.module(x)), row_units)
        detached = values.detach().cpu()
        alive &= torch.isfinite(detached)
        if step == 0:
            initial_values = detached.clone()
        improved = alive & (detached > best_values)
        best_values = torch.where(improved, detached, best_values)
        best_inputs[improved] = x.detach().cpu()[improved]
        best_steps[improved] = step
        if step == settings.steps or not alive.any():
            break
        (gradient,) = torch.autograd.grad(values[alive.to(values.device)].sum(), x)
        if step == 0:
            zero_gradient = bool((gradient[alive.to(gradient.device)] == 0).all())
        _step(x, gradient, alive, optimizer, settings)
        if progress is not None:
            progress.update(1)
    return Trajectory(best_inputs.numpy(), best_values.numpy(), best_steps.numpy(), initial_values.numpy(),
                      (~alive).numpy(), zero_gradient)


def _step(x: torch.Tensor, gradient: torch.Tensor, alive: torch.Tensor, optimizer, settings: Settings):
    """One update of the rows still alive, then the box constraint."""
    with torch.no_grad():
        gradient[~alive.to(gradient.device)] = 0
        if optimizer is None:
            x += settings.lr * gradient
        else:
            x.grad = -gradient
            optimizer.step()
        x.clamp_(*settings.input_range)


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class UnitResult:
    unit: int
    method: str
    activation: float
    initial_activation: float
    best_step: int
    seed_index: int
    best_input: np.ndarray = field(repr=False)
    onnxruntime_activation: float | None = None
    validated: bool | None = None
    status: str = "ok"  # ok | stopped (some seeds hit NaN or infinity) | nonfinite (no finite value at all)
    stopped_seeds: int = 0
    won_by: str | None = None  # for a portfolio: whether a vanilla or a ProxyGrad start found the best input

    @property
    def key(self) -> str:
        return f"unit{self.unit:03d}_{self.method}"

    def record(self) -> dict:
        return {"unit": self.unit, "method": self.method, "activation": report.json_number(self.activation),
                "onnxruntime_activation": report.json_number(self.onnxruntime_activation), "validated": self.validated,
                "initial_activation": report.json_number(self.initial_activation), "best_step": self.best_step,
                "best_seed": self.seed_index, "status": self.status, "stopped_seeds": self.stopped_seeds,
                "image": f"{self.key}.png", "input": self.key,
                **({"won_by": self.won_by} if self.won_by else {})}


def best_per_unit(trajectory: Trajectory, units: list[int], seeds: int, method: str,
                  vanilla_seeds: int = 0) -> list[UnitResult]:
    """Rows are laid out unit-major (unit 0's seeds, then unit 1's...); keep each unit's best seed. In a
    portfolio the first `vanilla_seeds` of each unit's seeds ran vanilla."""
    results = []
    for index, unit in enumerate(units):
        rows = slice(index * seeds, (index + 1) * seeds)
        values = trajectory.best_values[rows]
        seed = int(np.argmax(values))
        row = index * seeds + seed
        stopped_seeds = int(trajectory.stopped[rows].sum())
        status = "nonfinite" if not np.isfinite(values).any() else "stopped" if stopped_seeds else "ok"
        won_by = ("vanilla" if seed < vanilla_seeds else "proxygrad") if method == "portfolio" else None
        results.append(UnitResult(unit, method, float(values[seed]), float(trajectory.initial_values[row]),
                                  int(trajectory.best_steps[row]), seed, trajectory.best_inputs[row],
                                  status=status, stopped_seeds=stopped_seeds, won_by=won_by))
    return results


def rescore_and_validate(target: Target, objective: Objective, results: list[UnitResult], settings: Settings):
    """Re-score each best input in torch (the proxy's forward is the original network's) and in onnxruntime
    on the unchanged model; fills activation, onnxruntime_activation and validated."""
    scored = [result for result in results if result.status != "nonfinite"]
    if not scored:
        return
    inputs = np.stack([result.best_input for result in scored]).astype(np.float32)
    units = [result.unit for result in scored]
    with torch.no_grad():
        output = _first_output(target.module(torch.from_numpy(inputs).to(settings.device)))
        torch_values = objective.values(output, units).cpu().numpy()
    runtime_values = objective.values(target.scorer(inputs), units)
    validated = agree(torch_values, runtime_values, settings.atol, settings.rtol)
    for result, torch_value, runtime_value, ok in zip(scored, torch_values, runtime_values, validated):
        result.activation, result.onnxruntime_activation = float(torch_value), float(runtime_value)
        result.validated = ok


def maximize_units(target: Target, objective: Objective, units: list[int], methods: list[str], settings: Settings,
                   progress=None, start: torch.Tensor | None = None) -> tuple[list[UnitResult], bool]:
    """Every method from the same starting inputs (`start`, one row per unit and seed, unit-major; drawn from
    settings.seed when None) and budget; returns validated results (unit-major, then method) and whether the
    input gradient was zero everywhere at the start. Runs on one torch thread."""
    if start is None:
        start = starting_inputs(target.input_shape, len(units) * settings.seeds, settings)
    row_units = [unit for unit in units for _ in range(settings.seeds)]
    by_method = {}
    zero_gradient = False
    with one_torch_thread():
        for method in methods:
            trajectory = _run_method(method, target, objective, row_units, start, settings, progress)
            zero_gradient |= trajectory.zero_gradient
            by_method[method] = best_per_unit(trajectory, units, settings.seeds, method, portfolio_vanilla_seeds(settings))
        results = [by_method[method][index] for index in range(len(units)) for method in methods]
        rescore_and_validate(target, objective, results, settings)
    return results, zero_gradient


def _run_method(method: str, target: Target, objective: Objective, row_units: list[int], start: torch.Tensor,
                settings: Settings, progress) -> Trajectory:
    if method == "vanilla":
        return optimize(target, objective, row_units, start, settings, None, progress)
    if method == "proxygrad":
        return optimize(target, objective, row_units, start, settings, slope_schedule(settings), progress)
    return _portfolio(target, objective, row_units, start, settings, progress)


def optimizations(method: str, settings: Settings) -> int:
    """How many optimization runs of settings.steps a method takes (for progress bars)."""
    return 2 if method == "portfolio" and portfolio_vanilla_seeds(settings) else 1


def portfolio_vanilla_seeds(settings: Settings) -> int:
    """How many of each unit's seeds a portfolio runs with ordinary gradients: all but settings.proxygrad_seeds."""
    return max(0, settings.seeds - settings.proxygrad_seeds)


def portfolio_rows(rows: int, settings: Settings) -> np.ndarray:
    """Which rows of a unit-major batch run vanilla in a portfolio: the first seeds of each unit."""
    return np.arange(rows) % settings.seeds < portfolio_vanilla_seeds(settings)


def _portfolio(target, objective, row_units, start, settings, progress) -> Trajectory:
    """Each unit's first seeds with ordinary gradients, its last settings.proxygrad_seeds with ProxyGrad, at the
    budget of one method; best_per_unit then keeps the best by its true activation."""
    vanilla_rows = portfolio_rows(len(row_units), settings)
    parts = []
    for rows, slope in ((vanilla_rows, None), (~vanilla_rows, slope_schedule(settings))):
        if rows.any():
            units = [unit for unit, chosen in zip(row_units, rows) if chosen]
            parts.append((rows, optimize(target, objective, units, start[torch.from_numpy(rows)], settings, slope,
                                         progress)))
    first = parts[0][1]
    merged = {name: np.empty((len(row_units),) + getattr(first, name).shape[1:], getattr(first, name).dtype)
              for name in PER_ROW_FIELDS}
    for rows, trajectory in parts:
        for name, array in merged.items():
            array[rows] = getattr(trajectory, name)
    return Trajectory(**merged, zero_gradient=all(trajectory.zero_gradient for _, trajectory in parts))


@contextmanager
def one_torch_thread():
    """Our batches are small: on 2 cores shared with other jobs, the default `maximize` ran 3.5x faster on one
    thread than on torch's default of one per core (its threads spin, waiting for each other), and the numbers
    no longer depend on the machine's core count. Large models belong on the GPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
