"""Does ProxyGrad find higher maxima than ordinary gradient ascent on real models, and which settings are best?

For each model, layer (early, middle, late, logits) and input range (the paper's box [-1,1] and the model's
natural range), every configuration maximizes the same units from the same starting inputs with the same
steps and seeds: vanilla and ProxyGrad with sgd (the paper's x <- clip(x + lr * grad)) and adam, constant
backward slopes, slopes decaying to the forward slope by mid-run, and portfolios (half the seeds vanilla,
half ProxyGrad, taken from the same runs). Every unit's best input is re-scored by onnxruntime on the unchanged
model; all comparisons use those validated activations. The natural-data baseline is the unit's highest
activation over the real images. Run by hand, not in CI:

    python benchmarks/quality.py --json docs/figures/quality.json      # full run (< 30 min on 2 cores)
    python benchmarks/quality.py --quick                                # smoke run (< 3 min)
    python benchmarks/quality.py --tables-from docs/figures/quality.json  # tables again, no optimization

`--defaults` measures the shipped default of `onnxproxy maximize` exactly as it runs (`maximize_units` with
method portfolio and `Settings()`'s defaults) against vanilla Adam and vanilla sgd at the same steps, seeds and lr,
on the same models, layers, units and ranges:

    python benchmarks/quality.py --defaults --json docs/figures/defaults.json   # full run
    python benchmarks/quality.py --defaults --quick                             # smoke run (< 3 min)
    python benchmarks/quality.py --tables-from docs/figures/defaults.json       # tables again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onnxproxy import proxy
from onnxproxy.errors import UserError
from onnxproxy.graph import load_model, resolve_node
from onnxproxy.maximize import (Trajectory, best_per_unit, maximize_units, optimize, prepare_target,
                                rescore_and_validate, starting_inputs)
from onnxproxy.objectives import choose_objective
from onnxproxy.settings import Settings
from onnxproxy.validate import TensorScorer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "models"
BOX = (-1.0, 1.0)
OPTIMIZERS = ("sgd", "adam")
CONSTANT_SLOPES = (0.1, 0.3, 1.0)
DECAYING_SLOPES = (0.3,)
PORTFOLIO_SLOPE = 0.3
NATURAL_RANGE_ROLES = ("middle", "logits")  # the natural range on half the layers keeps the full run < 30 min
TOLERANCE = (1e-4, 1e-3)  # atol, rtol: values this close count as equal (the validation tolerance)


# ------------------------------------------------------------------------------------------------ subjects


def _mnist(transform):
    def images():
        pixels = np.load(SHARED / "mnist_test_first256.npz")["images"].astype(np.float32) / 255.0
        return transform(pixels[:, None])
    return images


def _cifar():
    return np.load(SHARED / "cifar10_normalized_vnnlib_centers20.npz")["images"]


def _digits():
    return np.load(ROOT / "models" / "digits_heldout.npz")["x"]


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
# Settings.input_range is one interval for all channels: take the intersection of the per-channel ranges, so
# every input stays a valid image.
CIFAR_RANGE = (float(np.max(-CIFAR_MEAN / CIFAR_STD)), float(np.min((1 - CIFAR_MEAN) / CIFAR_STD)))
MNIST_NORMALISED_RANGE = (-MNIST_MEAN / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD)


@dataclass(frozen=True)
class Subject:
    name: str
    path: Path
    layers: dict  # role -> node name
    natural_range: tuple | None  # None: the natural range is the box [-1, 1]
    natural_images: object = None  # () -> array of real inputs, or None when there are none


def _cifar_subject(name, early, middle, late, logits):
    layers = {"early": early, "middle": middle, "late": late, "logits": logits}
    return Subject(name, SHARED / f"{name}.onnx", layers, CIFAR_RANGE, _cifar)


SUBJECTS = [
    Subject("digits_cnn", ROOT / "models" / "digits_cnn.onnx",
            {"early": "conv2", "middle": "conv3", "late": "fc", "logits": "logits"}, None, _digits),
    _cifar_subject("cifar10_resnet_2b", "Conv_2", "Conv_8", "Gemm_14", "Gemm_16"),
    _cifar_subject("cifar10_resnet_4b", "Conv_2", "Add_11", "Add_22", "Gemm_27"),
    _cifar_subject("cifar10_resnet_3b2_sri", "Conv_2", "Add_12", "Add_18", "Gemm_23"),
    _cifar_subject("cifar10_cnn_oval21_base", "Conv_2", "Gemm_5", "Gemm_5", "Gemm_7"),
    _cifar_subject("cifar10_cnn_oval21_deep", "Conv_2", "Conv_4", "Gemm_9", "Gemm_11"),
    Subject("mnist_cnn_pytorch_baskov", SHARED / "mnist_cnn_pytorch_baskov.onnx",
            {"early": "/conv2/Conv", "middle": "/fc1/Gemm", "late": "/fc1/Gemm", "logits": "/fc2/Gemm"},
            MNIST_NORMALISED_RANGE, _mnist(lambda x: (x - MNIST_MEAN) / MNIST_STD)),
    Subject("mnist_cnn_chainer_fan2tamo", SHARED / "mnist_cnn_chainer_fan2tamo.onnx",
            {"early": "Convolution2DFunction_1", "middle": "LinearFunction_0", "late": "LinearFunction_0",
             "logits": "LinearFunction_1"}, (0.0, 1.0), _mnist(lambda x: np.repeat(x, 3, axis=1))),
    Subject("mnist_mlp_relu_9x200_eran", SHARED / "mnist_mlp_relu_9x200_eran.onnx",
            {"early": "Gemm_7", "middle": "Gemm_13", "late": "Gemm_19", "logits": "Gemm_21"},
            (0.0, 1.0), _mnist(lambda x: x)),
    Subject("mtcnn_rnet_prelu", SHARED / "mtcnn_rnet_prelu_facenet_pytorch.onnx",
            {"early": "/conv2/Conv", "middle": "/conv3/Conv", "late": "/dense4/Gemm", "logits": "/dense5_1/Gemm"},
            None, None),
]


def _distinct_layers(subject: Subject, roles) -> dict:
    """Small models have fewer layers than roles: measure each node once, under its first role."""
    layers = {}
    for role in roles:
        if subject.layers[role] not in layers.values():
            layers[role] = subject.layers[role]
    return layers


# ------------------------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Run:
    """One optimize call: optimizer and backward slope, constant (None = vanilla) or decaying by mid-run."""

    optimizer: str
    slope: float | None
    decaying: bool = False

    @property
    def name(self) -> str:
        if self.slope is None:
            return f"{self.optimizer} vanilla"
        return f"{self.optimizer} b={self.slope:g}" + ("->0 by mid" if self.decaying else "")


def runs() -> list[Run]:
    return [run for optimizer in OPTIMIZERS for run in (
        [Run(optimizer, None)] + [Run(optimizer, slope) for slope in CONSTANT_SLOPES]
        + [Run(optimizer, slope, decaying=True) for slope in DECAYING_SLOPES])]


def portfolio_name(optimizer: str, run: Run) -> str:
    return f"{optimizer} half vanilla + half {run.name.split(' ', 1)[1]}"


class SlopeSchedule(torch.nn.Module):
    """Sets the proxy's backward slope before every forward pass, i.e. per optimization step, so that
    `optimize` (which runs one forward per step) follows a schedule with its optimizer state intact."""

    def __init__(self, module: torch.nn.Module, slope_at_step):
        super().__init__()
        self.module = module
        self.slope_at_step = slope_at_step
        self.step = 0

    def forward(self, x):
        proxy.set_backward_slope(self.module, self.slope_at_step(self.step))
        self.step += 1
        return self.module(x)


def decaying_to_forward_slope(slope: float, steps: int):
    """Linear from `slope` to 0 over the first half, then the forward slope (ordinary gradients)."""
    half = steps / 2
    return lambda step: slope * (1 - step / half) if step < half else None


def run_optimization(target, objective, row_units, start, settings: Settings, run: Run) -> Trajectory:
    settings = dataclasses.replace(settings, optimizer=run.optimizer)
    if not run.decaying:
        return optimize(target, objective, row_units, start, settings, run.slope)
    scheduled = SlopeSchedule(target.module, decaying_to_forward_slope(run.slope, settings.steps))
    return optimize(dataclasses.replace(target, module=scheduled), objective, row_units, start, settings, run.slope)


def accepts_batches(target) -> bool:
    """Some exporters bake batch size 1 into a Reshape; such targets are optimized one row at a time."""
    try:
        with torch.no_grad():
            target.module(torch.zeros([2] + target.input_shape))
        return True
    except RuntimeError:
        return False


def optimize_rows_apart(target, objective, row_units, start, settings: Settings, run: Run) -> Trajectory:
    rows = [run_optimization(target, objective, row_units[i:i + 1], start[i:i + 1], settings, run)
            for i in range(len(row_units))]

    def joined(name):
        values = [getattr(row, name) for row in rows]
        return np.concatenate(values) if isinstance(values[0], np.ndarray) else all(values)

    return Trajectory(**{field.name: joined(field.name) for field in dataclasses.fields(Trajectory)})


def portfolio(vanilla: Trajectory, proxied: Trajectory, seeds: int) -> Trajectory:
    """Each unit's first half of the seeds from the vanilla run, the rest from the ProxyGrad run (same starts)."""
    from_vanilla = np.arange(len(vanilla.best_values)) % seeds < seeds // 2

    def pick(name):
        a, b = getattr(vanilla, name), getattr(proxied, name)
        if not isinstance(a, np.ndarray):
            return a and b
        return np.where(from_vanilla.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return Trajectory(**{field.name: pick(field.name) for field in dataclasses.fields(Trajectory)})


# ------------------------------------------------------------------------------------------------ measuring


def sample_units(count: int, how_many: int, seed: int) -> list[int]:
    chosen = np.random.default_rng(seed).choice(count, size=min(how_many, count), replace=False)
    return sorted(int(unit) for unit in chosen)


def natural_maxima(model, node, objective, units, images) -> list[float]:
    outputs = TensorScorer(model.original, model.input.name, node.output)(images)
    return [float(np.max(objective.values(outputs, [unit] * len(images)))) for unit in units]


def measure_layer(subject: Subject, model, role: str, node_name: str, ranges: dict, options) -> list[dict]:
    node = resolve_node(model, node_name)
    target = prepare_target(model, node, PORTFOLIO_SLOPE, "cpu")
    objective = choose_objective(None, node.shape, None)
    units = sample_units(target.unit_count, options.units, seed=len(node.name))
    natural = (natural_maxima(model, node, objective, units, subject.natural_images())
               if subject.natural_images else [None] * len(units))
    row_units = [unit for unit in units for _ in range(options.seeds)]
    batches = accepts_batches(target)
    optimizing = run_optimization if batches else optimize_rows_apart
    records = []
    for range_name, input_range in ranges.items():
        settings = Settings(steps=options.steps, lr=options.lr, seeds=options.seeds, input_range=input_range)
        start = starting_inputs(target.input_shape, len(row_units), settings)
        trajectories = {run: optimizing(target, objective, row_units, start, settings, run) for run in runs()}
        results = []
        for run, trajectory in trajectories.items():
            results += best_per_unit(trajectory, units, options.seeds, run.name)
            if run.decaying or run.slope == PORTFOLIO_SLOPE:
                mixed = portfolio(trajectories[Run(run.optimizer, None)], trajectory, options.seeds)
                results += best_per_unit(mixed, units, options.seeds, portfolio_name(run.optimizer, run))
        for chunk in [results] if batches else [[result] for result in results]:
            rescore_and_validate(target, objective, chunk, settings)
        for result in results:
            records.append({"model": subject.name, "role": role, "node": node.name, "range": range_name,
                            "unit": result.unit, "config": result.method, "value": result.onnxruntime_activation,
                            "validated": result.validated,
                            "natural_max": natural[units.index(result.unit)]})
    return records


def measure(options, measure_one=None) -> list[dict]:
    measure_one = measure_one or measure_layer
    records = []
    for subject in SUBJECTS:
        if options.models and subject.name not in options.models:
            continue
        if not subject.path.exists():
            print(f"skipped {subject.name}: {subject.path} not present", file=sys.stderr)
            continue
        model = load_model(subject.path)
        for role, node_name in _distinct_layers(subject, options.roles).items():
            ranges = {"box [-1,1]": BOX}
            if subject.natural_range and role in NATURAL_RANGE_ROLES:
                ranges["natural"] = subject.natural_range
            began = time.perf_counter()
            records += measure_one(subject, model, role, node_name, ranges, options)
            if options.json:  # after every layer, so a run cut short still leaves its records
                _save(options, records, "(partial)")
            print(f"{subject.name:28s} {role:7s} {node_name:24s} {time.perf_counter() - began:6.1f} s",
                  file=sys.stderr, flush=True)
    return records


# ------------------------------------------------------------------------------------ the shipped default

DEFAULT_CONFIG = "default (portfolio)"
VANILLA_CONFIGS = ("adam vanilla", "sgd vanilla")
STALL_SHARE = 0.01  # vanilla stalls: its best gain over the start is below 1% of the unit's scale


def measure_defaults_layer(subject: Subject, model, role: str, node_name: str, ranges: dict, options) -> list[dict]:
    """The shipped default exactly as `onnxproxy maximize` runs it (maximize_units, method portfolio, Settings()'s
    defaults but steps/seeds/lr/range), and vanilla Adam and vanilla sgd with the same budget and starting inputs."""
    node = resolve_node(model, node_name)
    try:
        target = prepare_target(model, node, Settings().backward_slope, "cpu")
    except UserError as error:  # e.g. a graph that cannot run a batch: `onnxproxy maximize` refuses it too
        print(f"skipped {subject.name} {role}: {error}", file=sys.stderr)
        return []
    objective = choose_objective(None, node.shape, None)
    units = sample_units(target.unit_count, options.units, seed=len(node.name))
    natural = (natural_maxima(model, node, objective, units, subject.natural_images())
               if subject.natural_images else [None] * len(units))
    records = []
    for range_name, input_range in ranges.items():
        budget = dict(steps=options.steps, lr=options.lr, seeds=options.seeds, input_range=input_range)
        default = Settings(**budget)
        start = starting_inputs(target.input_shape, len(units) * options.seeds, default)
        for config, method, settings in ((DEFAULT_CONFIG, "portfolio", default),
                                         ("adam vanilla", "vanilla", Settings(optimizer="adam", **budget)),
                                         ("sgd vanilla", "vanilla", Settings(optimizer="sgd", **budget))):
            results, _ = maximize_units(target, objective, units, [method], settings, start=start)
            for result in results:
                records.append({"model": subject.name, "role": role, "node": node.name, "range": range_name,
                                "unit": result.unit, "config": config, "value": result.onnxruntime_activation,
                                "validated": result.validated, "initial": result.initial_activation,
                                "won_by": result.won_by, "best_seed": result.seed_index, "seeds": options.seeds,
                                "natural_max": natural[units.index(result.unit)]})
    return records


def _outcome_cells(units: list[dict]) -> list:
    """The default against the best vanilla value per unit: reaches, within 1%, higher, lower by > 5%, median."""
    outcomes = [compare(values[DEFAULT_CONFIG], _best_vanilla(values)) for values in units]
    return [_share(sum(o >= 0 for o in outcomes), len(units)),
            _share(len(units) - _below(units, DEFAULT_CONFIG, 0.01), len(units)), outcomes.count(1),
            _below(units, DEFAULT_CONFIG, 0.05),
            _median_ratio((values[DEFAULT_CONFIG], _best_vanilla(values)) for values in units)]


OUTCOME_HEADER = ["default reaches best vanilla", "within 1%", "higher", "lower by > 5%", "median ratio"]


def _defaults_units(records) -> dict:
    units = _by_unit(records)
    for record in records:  # keep the extra fields of the defaults run
        values = units[(record["model"], record["role"], record["range"], record["unit"])]
        values.setdefault("initial", {})[record["config"]] = record["initial"]
        values.setdefault("best_seed", {})[record["config"]] = record.get("best_seed")
        values["seeds"] = record.get("seeds")
        if record["config"] == DEFAULT_CONFIG:
            values["won_by"] = record["won_by"]
    return units


def stalls(values: dict) -> bool:
    """Neither vanilla optimizer moved its unit off its start by more than 1% of the unit's scale (the natural-data
    maximum, else the default's value) plus the validation tolerance."""
    scale = abs(values["natural_max"]) if values["natural_max"] is not None else abs(values[DEFAULT_CONFIG])
    atol, rtol = TOLERANCE
    return all(values[c] - values["initial"][c] <= atol + rtol * abs(values["initial"][c]) + STALL_SHARE * scale
               for c in VANILLA_CONFIGS)


def defaults_report(records) -> str:
    units = _defaults_units(records)
    ranges = list(dict.fromkeys(key[2] for key in units))
    unvalidated = [record for record in records if not record["validated"]]
    overall = []
    for range_name in ranges + ["all"]:
        chosen = [v for key, v in units.items() if range_name in ("all", key[2])]
        won = sum(v["won_by"] == "proxygrad" for v in chosen)
        overall.append([range_name, *_outcome_cells(chosen), _share(won, len(chosen))])
    by_model = {}
    for key, values in units.items():
        by_model.setdefault(key[0], []).append(values)
    per_model = [[model, *_outcome_cells(chosen), f"{sum(v['won_by'] == 'proxygrad' for v in chosen)}/{len(chosen)}"]
                 for model, chosen in by_model.items()]
    per_layer = []
    for range_name in ranges:
        groups = {}
        for key, values in units.items():
            if key[2] == range_name:
                groups.setdefault(key[:2], []).append(values)
        for (model, role), chosen in groups.items():
            won = sum(v["won_by"] == "proxygrad" for v in chosen)
            per_layer.append([model, role, range_name, *_outcome_cells(chosen), f"{won}/{len(chosen)}"])
    stalled = [[*key[:3], key[3], values["sgd vanilla"], values["adam vanilla"], values[DEFAULT_CONFIG],
                values["won_by"], ["lower", "equal", "higher"][compare(values[DEFAULT_CONFIG], _best_vanilla(values)) + 1]]
               for key, values in units.items() if stalls(values)]
    stall_summary = (f"{len(stalled)} unit-range pairs where vanilla stalls; the default is higher on "
                     f"{sum(row[-1] == 'higher' for row in stalled)}, equal on "
                     f"{sum(row[-1] == 'equal' for row in stalled)}, lower on {sum(row[-1] == 'lower' for row in stalled)}")
    lower = [v for v in units.values() if compare(v[DEFAULT_CONFIG], _best_vanilla(v)) < 0]
    late_seed = [v for v in lower if v["seeds"] and v["best_seed"]["adam vanilla"] is not None
                 and v["best_seed"]["adam vanilla"] >= v["seeds"] // 2 and v["adam vanilla"] >= v["sgd vanilla"]]
    misses = (f"The default is lower than the best vanilla value on {len(lower)} unit-range pairs; on {len(late_seed)} of "
              "them vanilla Adam found its best from a starting input that the portfolio gives to its ProxyGrad half.")
    return "\n\n".join([
        f"{len(units)} unit-range pairs; {len(unvalidated)} of {len(records)} best inputs failed onnxruntime validation",
        "### The default against the best of {vanilla sgd, vanilla adam}, overall",
        _table(["range", *OUTCOME_HEADER, "won by the ProxyGrad half"], overall), misses,
        "### Per model (all layers, both ranges)", _table(["model", *OUTCOME_HEADER, "won by ProxyGrad"], per_model),
        "### Every configuration, per range", *(f"{r}:\n\n" + overall_table(records, r) for r in ranges),
        "### Per model and layer", _table(["model", "layer", "range", *OUTCOME_HEADER, "won by ProxyGrad"], per_layer),
        "### Where vanilla stalls", stall_summary,
        _table(["model", "layer", "range", "unit", "sgd vanilla", "adam vanilla", "default", "won by", "default vs best vanilla"],
               stalled) if stalled else "",
        "### Against the natural-data baseline", natural_table(records, ["sgd vanilla", "adam vanilla", DEFAULT_CONFIG])])


# ------------------------------------------------------------------------------------------------- analysis


def _close(value, reference) -> bool:
    atol, rtol = TOLERANCE
    return abs(value - reference) <= atol + rtol * abs(reference)


def _by_unit(records) -> dict:
    """(model, role, range, unit) -> {config: validated value}."""
    units = {}
    for record in records:
        key = (record["model"], record["role"], record["range"], record["unit"])
        units.setdefault(key, {"natural_max": record["natural_max"]})[record["config"]] = record["value"]
    return units


def _best_vanilla(values: dict) -> float:
    return max(values[f"{optimizer} vanilla"] for optimizer in OPTIMIZERS)


def compare(value, reference) -> int:
    """+1 higher, 0 equal within the tolerance, -1 lower."""
    return 0 if _close(value, reference) else (1 if value > reference else -1)


def _median_ratio(pairs) -> float:
    ratios = [value / reference for value, reference in pairs if reference > 0]
    return statistics.median(ratios) if ratios else math.nan


def configs_of(records) -> list[str]:
    return list(dict.fromkeys(record["config"] for record in records))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(cell) -> str:
    if isinstance(cell, float):
        return "n/a" if math.isnan(cell) else f"{cell:.3f}"
    return str(cell)


def _share(count: int, total: int) -> str:
    return f"{count}/{total} ({100 * count / total:.0f}%)" if total else "n/a"


def overall_table(records, range_name: str) -> str:
    """Per configuration, against the best of vanilla sgd and vanilla adam on each unit."""
    units = [values for key, values in _by_unit(records).items() if key[2] == range_name]
    rows = []
    for config in configs_of(records):
        outcomes = [compare(values[config], _best_vanilla(values)) for values in units]
        within_one_percent = len(units) - _below(units, config, 0.01)
        rows.append([config, _share(sum(o >= 0 for o in outcomes), len(units)), _share(within_one_percent, len(units)),
                     outcomes.count(1), _below(units, config, 0.05),
                     _median_ratio((values[config], _best_vanilla(values)) for values in units)])
    rows.sort(key=lambda row: (-int(row[1].split("/")[0]), -_nan_low(row[5])))
    return _table(["configuration", "reaches best vanilla", "within 1% of it", "higher", "lower by > 5%",
                   "median ratio to best vanilla"], rows)


def _below(units, config: str, fraction: float) -> int:
    """How many units the configuration misses the best vanilla value by more than `fraction` of it."""
    atol = TOLERANCE[0]
    return sum(values[config] < _best_vanilla(values) - atol - fraction * abs(_best_vanilla(values))
               for values in units)


FAMILIES = {"vanilla": lambda config: "vanilla" in config and "half" not in config,
            "ProxyGrad constant b": lambda config: "b=" in config and "->" not in config and "half" not in config,
            "ProxyGrad b decaying": lambda config: "->" in config and "half" not in config,
            "portfolio": lambda config: "half" in config}


def per_layer_table(records, range_name: str) -> str:
    """Share of units each family wins (ties count for all tied), and the best single setting."""
    groups = {}
    for key, values in _by_unit(records).items():
        if key[2] == range_name:
            groups.setdefault(key[:2], []).append(values)
    configs = configs_of(records)
    rows = []
    for (model, role), units in groups.items():
        shares = []
        for belongs in FAMILIES.values():
            family = [config for config in configs if belongs(config)]
            wins = sum(_close(max(values[c] for c in family), max(values[c] for c in configs)) for values in units)
            shares.append(f"{wins}/{len(units)}")
        best = max(configs, key=lambda config: (sum(_close(values[config], max(values[c] for c in configs))
                                                    for values in units),
                                                _nan_low(_median_ratio((values[config], _best_vanilla(values))
                                                                       for values in units))))
        rows.append([model, role, *shares, best,
                     _median_ratio((values[best], _best_vanilla(values)) for values in units)])
    return _table(["model", "layer", *(f"{family} wins" for family in FAMILIES), "best setting",
                   "its median ratio to best vanilla"], rows)


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def paper_protocol_table(records) -> str:
    """The paper's protocol: sgd in the box [-1,1]; ProxyGrad against vanilla sgd, per model."""
    groups = {}
    for key, values in _by_unit(records).items():
        if key[2] == "box [-1,1]":
            groups.setdefault(key[0], []).append(values)
    rows = []
    for model, units in groups.items():
        row = [model]
        for slope in CONSTANT_SLOPES:
            outcomes = [compare(values[f"sgd b={slope:g}"], values["sgd vanilla"]) for values in units]
            ratio = _median_ratio((values[f"sgd b={slope:g}"], values["sgd vanilla"]) for values in units)
            row.append(f"{outcomes.count(1)}/{outcomes.count(0)}/{outcomes.count(-1)}, {_cell(ratio)}")
        rows.append(row)
    return _table(["model", *(f"sgd b={slope:g} vs sgd vanilla: higher/equal/lower, median ratio"
                              for slope in CONSTANT_SLOPES)], rows)


def natural_table(records, candidates: list[str]) -> str:
    """Median over units of the maximized activation / the highest activation over the real images."""
    groups = {}
    for key, values in _by_unit(records).items():
        if values["natural_max"] is not None:
            groups.setdefault((key[0], key[1], key[2]), []).append(values)
    rows = []
    for (model, role, range_name), units in groups.items():
        above = sum(max(values[c] for c in candidates) > values["natural_max"] for values in units)
        rows.append([model, role, range_name, statistics.median(values["natural_max"] for values in units),
                     *(_median_ratio((values[c], values["natural_max"]) for values in units) for c in candidates),
                     f"{above}/{len(units)}"])
    return _table(["model", "layer", "range", "natural max (median)",
                   *(f"{c} / natural" for c in candidates), "units above natural max"], rows)


def report(records) -> str:
    ranges = list(dict.fromkeys(record["range"] for record in records))
    unvalidated = [record for record in records if not record["validated"]]
    sections = [f"{len(_by_unit(records))} unit-range pairs; {len(unvalidated)} of {len(records)} best inputs "
                "failed onnxruntime validation"]
    for range_name in ranges:
        sections += [f"### All units, {range_name}", overall_table(records, range_name),
                     f"### Per model and layer, {range_name}", per_layer_table(records, range_name)]
    sections += ["### The paper's protocol (sgd, box [-1,1])", paper_protocol_table(records),
                 "### Against the natural-data baseline",
                 natural_table(records, ["sgd vanilla", "adam vanilla", "adam b=0.3", "adam b=0.3->0 by mid"])]
    return "\n\n".join(sections)


def _header(options) -> str:
    return (f"{'defaults' if options.defaults else 'sweep'}: units {options.units}/layer, seeds {options.seeds}, "
            f"steps {options.steps}, lr {options.lr}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{time.perf_counter() - options.began:.0f} s")


def _save(options, records, note=""):
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps({"header": f"{_header(options)} {note}".strip(), "records": records},
                                       separators=(",", ":")))


def any_report(records) -> str:
    return defaults_report(records) if any(r["config"] == DEFAULT_CONFIG for r in records) else report(records)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defaults", action="store_true",
                        help="measure the shipped default (portfolio) against vanilla sgd and adam at equal budget")
    parser.add_argument("--quick", action="store_true", help="2 units, 2 layers, 24 steps: a smoke run")
    parser.add_argument("--units", type=int, help="units sampled per layer (default 4, with --defaults 8)")
    parser.add_argument("--seeds", type=int, help="starting inputs per unit (even, for portfolios; default 2, "
                        f"with --defaults {Settings.seeds})")
    parser.add_argument("--steps", type=int, help=f"default 128, with --defaults {Settings.steps}")
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--models", help="comma-separated model names to measure (default all)")
    parser.add_argument("--json", type=Path, help="write the raw records here (after every layer)")
    parser.add_argument("--tables-from", type=Path, nargs="+",
                        help="print the tables of saved --json files (records joined) and exit")
    options = parser.parse_args()
    options.roles = ("middle", "logits") if options.quick else ("early", "middle", "late", "logits")
    options.units = options.units or (8 if options.defaults else 4)
    options.seeds = options.seeds or (Settings.seeds if options.defaults else 2)
    options.steps = options.steps or (Settings.steps if options.defaults else 128)
    options.models = set(options.models.split(",")) if options.models else None
    if options.quick:
        options.units, options.steps = 2, 24
    torch.set_num_threads(1)  # on 2 shared cores, 2 threads ran 5-15x slower than 1 (contention)
    if options.tables_from:
        print(any_report([r for path in options.tables_from for r in json.loads(path.read_text())["records"]]))
        return
    options.began = time.perf_counter()
    records = measure(options, measure_defaults_layer if options.defaults else measure_layer)
    if options.json:
        _save(options, records)
    print(_header(options) + "\n\n" + any_report(records))


if __name__ == "__main__":
    main()
