"""Activation maximization with ProxyGrad: prepare the cut proxy graph for a target, run the optimization
loop for many units and seeds as one batch, keep the best input per row by its true activation, and
validate the winners with onnxruntime on the unchanged model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from onnxproxy import graph, proxy
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
    rewritten: dict
    after_softmax: bool

    @property
    def tensor(self) -> str:
        return self.node.output

    @property
    def unit_count(self):
        return self.node.channels if isinstance(self.node.channels, int) else None


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
    after_softmax = any(n.op_type in ("Softmax", "LogSoftmax") for n in cut.graph.node)
    proxy_model, rewritten = proxy.build_proxy(cut, backward_slope)
    module = graph.to_torch(proxy_model).to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return Target(model, node, module, list(model.input.shape[1:]), dict(rewritten), after_softmax)


@dataclass
class Trajectory:
    """Per batch row: the best input seen, its true activation, the step it was seen at, and the start."""

    best_inputs: np.ndarray
    best_values: np.ndarray
    best_steps: np.ndarray
    initial_values: np.ndarray
    nonfinite: np.ndarray  # rows stopped because their activation became NaN or infinite
    zero_gradient: bool  # the input gradient was exactly zero for every row at the start


def starting_inputs(shape: list[int], rows: int, settings: Settings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    low, high = settings.input_range
    return low + (high - low) * torch.rand([rows] + shape, generator=generator)


def optimize(target: Target, objective: Objective, row_units: list[int], start: torch.Tensor,
             settings: Settings, backward_slope, progress=None) -> Trajectory:
    """Gradient ascent from `start` on every row at once. backward_slope None = ordinary gradients."""
    proxy.set_backward_slope(target.module, backward_slope)
    low, high = settings.input_range
    x = start.clone().to(settings.device).requires_grad_(True)
    rows = x.shape[0]
    optimizer = torch.optim.Adam([x], lr=settings.lr) if settings.optimizer == "adam" else None
    best_values = torch.full((rows,), -math.inf)
    best_inputs = start.clone()
    best_steps = torch.zeros(rows, dtype=torch.long)
    alive = torch.ones(rows, dtype=torch.bool)
    initial_values = zero_gradient = None
    for step in range(settings.steps + 1):
        values = objective.values(_first_output(target.module(x)), row_units)
        detached = values.detach().cpu()
        alive &= torch.isfinite(detached)
        if initial_values is None:
            initial_values = detached.clone()
        improved = alive & (detached > best_values)
        best_values = torch.where(improved, detached, best_values)
        best_inputs[improved] = x.detach().cpu()[improved]
        best_steps[improved] = step
        if step == settings.steps or not alive.any():
            break
        (gradient,) = torch.autograd.grad(values[alive.to(values.device)].sum(), x)
        if zero_gradient is None:
            zero_gradient = bool((gradient == 0).all())
        with torch.no_grad():
            gradient[~alive.to(gradient.device)] = 0
            if optimizer is None:
                x += settings.lr * gradient
            else:
                x.grad = -gradient
                optimizer.step()
            x.clamp_(low, high)
        if progress is not None:
            progress.update(1)
    return Trajectory(best_inputs.numpy(), best_values.numpy(), best_steps.numpy(), initial_values.numpy(),
                      (~alive).numpy(), bool(zero_gradient))


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
    status: str = "ok"

    @property
    def key(self) -> str:
        return f"unit{self.unit:03d}_{self.method}"

    def record(self) -> dict:
        return {"unit": self.unit, "method": self.method, "activation": _json_float(self.activation),
                "onnxruntime_activation": _json_float(self.onnxruntime_activation), "validated": self.validated,
                "initial_activation": _json_float(self.initial_activation), "best_step": self.best_step,
                "best_seed": self.seed_index, "status": self.status, "image": f"{self.key}.png", "input": self.key}


def _json_float(value):
    return None if value is None or not math.isfinite(value) else float(value)


def best_per_unit(trajectory: Trajectory, units: list[int], seeds: int, method: str) -> list[UnitResult]:
    """Rows are laid out unit-major (unit 0's seeds, then unit 1's...); keep each unit's best seed."""
    results = []
    for index, unit in enumerate(units):
        rows = slice(index * seeds, (index + 1) * seeds)
        values = trajectory.best_values[rows]
        seed = int(np.argmax(values))
        row = index * seeds + seed
        status = "ok"
        if not np.isfinite(values).any():
            status = "nonfinite"
        elif trajectory.nonfinite[rows].any():
            status = "some seeds stopped: activation became NaN or infinite"
        results.append(UnitResult(unit, method, float(values[seed]), float(trajectory.initial_values[row]),
                                  int(trajectory.best_steps[row]), seed, trajectory.best_inputs[row]))
        results[-1].status = status
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
    runtime_values = objective.values(TensorScorer(target.model.original, target.model.input.name,
                                                   target.tensor)(inputs), units)
    agreement = agree(torch_values, runtime_values, settings.atol, settings.rtol)
    for result, torch_value, runtime_value, ok in zip(scored, torch_values, runtime_values, agreement.validated):
        result.activation, result.onnxruntime_activation, result.validated = float(torch_value), float(runtime_value), ok


def maximize_units(target: Target, objective: Objective, units: list[int], methods: list[str], settings: Settings,
                   progress=None) -> tuple[list[UnitResult], bool]:
    """Every method from the same starting inputs and budget; returns validated results (unit-major, then
    method) and whether the input gradient was zero everywhere at the start."""
    start = starting_inputs(target.input_shape, len(units) * settings.seeds, settings)
    row_units = [unit for unit in units for _ in range(settings.seeds)]
    by_method = {}
    zero_gradient = False
    for method in methods:
        slope = settings.backward_slope if method == "proxygrad" else None
        trajectory = optimize(target, objective, row_units, start, settings, slope, progress)
        zero_gradient |= trajectory.zero_gradient
        by_method[method] = best_per_unit(trajectory, units, settings.seeds, method)
    results = [by_method[method][index] for index in range(len(units)) for method in methods]
    rescore_and_validate(target, objective, results, settings)
    return results, zero_gradient
