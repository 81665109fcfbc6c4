"""How fast is onnxproxy's activation maximization, against itself and against what users would otherwise do.

Every comparison is a ratio of two things measured side by side in one run: repetitions alternate between
them so that load from other processes hits both alike, and medians are reported. Absolute times vary
between machines; the ratios are the result. Run by hand, not in CI:

    python benchmarks/speed.py --device cpu            # full (< 30 min on 2 shared cores)
    python benchmarks/speed.py --device cpu --quick    # smoke run (< 3 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dual_slope_overhead import CLOCKS, MODELS as OVERHEAD_MODELS, compare as dual_slope_step_times  # noqa: E402

from onnxproxy import maximize  # noqa: E402
from onnxproxy.graph import load_model, resolve_node, to_torch  # noqa: E402
from onnxproxy.objectives import choose_objective  # noqa: E402
from onnxproxy.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESNET = ROOT.parent / "shared" / "models" / "cifar10_resnet_4b.onnx"
RESNET_LAYERS = {"early": "Conv_2", "middle": "Add_11", "late": "Add_22"}
DIGITS = ROOT / "models" / "digits_cnn.onnx"
BATCH_UNITS = 16


def interleaved(contenders: dict, repeats: int, clock) -> dict[str, float]:
    """Median seconds of each zero-argument callable, alternating their order every repetition."""
    for run in contenders.values():
        run()  # warm-up
    times = {name: [] for name in contenders}
    for repeat in range(repeats):
        order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
        for name in order:
            began = clock()
            contenders[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(clock() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def table(header: list[str], rows: list[list]) -> str:
    cells = [[f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


# ------------------------------------------------------------------------------------------------ contenders


def _target(path: Path, node_name: str, device: str):
    model = load_model(path)
    node = resolve_node(model, node_name)
    return model, node, maximize.prepare_target(model, node, Settings.backward_slope, device)


def proxygrad_run(target, units: list[int], settings: Settings):
    """onnxproxy's loop: the cut proxy graph, every unit a row of one batch."""
    objective = choose_objective(None, target.node.shape, None)
    start = maximize.starting_inputs(target.input_shape, len(units), settings)
    return lambda: maximize.optimize(target, objective, units, start, settings, Settings.backward_slope)


class HookedModel:
    """What hook-based tools such as Lucent do: run the whole model and catch the layer's output."""

    def __init__(self, module: torch.nn.Module, node):
        self.module = module.requires_grad_(False)
        self.captured = None
        self.module.get_submodule(node.name).register_forward_hook(self._catch)
        self.objective = choose_objective(None, node.shape, None)

    def _catch(self, module, inputs, output):
        self.captured = output

    def values(self, x: torch.Tensor, units: list[int]) -> torch.Tensor:
        self.module(x)
        return self.objective.values(self.captured, units)


def hooked_step(hooked: HookedModel, rows: int, input_shape, device: str):
    x = torch.rand([rows] + input_shape, device=device, requires_grad=True)
    units = list(range(rows))
    return lambda: torch.autograd.grad(hooked.values(x, units).sum(), x)


def cut_step(target, rows: int, device: str):
    objective = choose_objective(None, target.node.shape, None)
    x = torch.rand([rows] + target.input_shape, device=device, requires_grad=True)
    units = list(range(rows))
    return lambda: torch.autograd.grad(objective.values(target.module(x), units).sum(), x)


def lucent_style_run(hooked: HookedModel, input_shape, units: list[int], steps: int, lr: float, device: str):
    """A hand-written loop: one unit at a time, full forward with a hook, Adam, clamp to the box."""
    def run():
        for unit in units:
            x = (torch.rand([1] + input_shape, device=device) * 2 - 1).requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad()
                (-hooked.values(x, [unit]).sum()).backward()
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(-1, 1)
    return run


# ---------------------------------------------------------------------------------------------- measurements


def dual_slope_overhead(options) -> str:
    rows = []
    for name, path in OVERHEAD_MODELS.items():
        if path.exists():
            median = dual_slope_step_times(path, options.device, BATCH_UNITS, options.repeats, options.steps // 4,
                                                  options.clock)
            rows.append([name, median["plain"] * 1e3, median["proxy"] * 1e3, median["ratio"]])
    return table(["model", "plain ReLU ms/step", "dual-slope ms/step", "ratio (goal <= 1.05)"], rows)


def graph_cutting(options) -> str:
    rows = []
    for role, node_name in RESNET_LAYERS.items():
        model, node, target = _target(RESNET, node_name, options.device)
        whole_proxy = _target(RESNET, model.outputs[0].name, options.device)[2].module  # same ops, no cut
        hooked = HookedModel(whole_proxy, node)
        median = interleaved({"cut": cut_step(target, BATCH_UNITS, options.device),
                              "full": hooked_step(hooked, BATCH_UNITS, target.input_shape, options.device)},
                             options.repeats, options.clock)
        rows.append([role, node_name, median["cut"] * 1e3, median["full"] * 1e3, median["cut"] / median["full"]])
    return table(["layer", "node", "cut graph ms/step", "whole graph + hook ms/step", "ratio"], rows)


def batching(options) -> str:
    _, _, target = _target(DIGITS, "conv3", options.device)
    settings = Settings(steps=options.steps, seeds=1, device=options.device)
    units = list(range(BATCH_UNITS))
    batched = proxygrad_run(target, units, settings)
    one_by_one = [proxygrad_run(target, [unit], settings) for unit in units]
    median = interleaved({"batch": batched, "apart": lambda: [run() for run in one_by_one]}, options.repeats // 4,
                         options.clock)
    per_second = {name: BATCH_UNITS / seconds for name, seconds in median.items()}
    ratio = per_second["batch"] / per_second["apart"]
    return table(["model", f"{BATCH_UNITS} units in one batch, units/s", f"{BATCH_UNITS} runs of one unit, units/s",
                  "ratio (goal >= 3)"], [["digits_cnn conv3", per_second["batch"], per_second["apart"], ratio]])


def against_lucent(options) -> str:
    rows = []
    for label, path, node_name in (("digits_cnn conv3", DIGITS, "conv3"),
                                   ("cifar10_resnet_4b Add_11", RESNET, "Add_11")):
        if not path.exists():
            continue
        model, node, target = _target(path, node_name, options.device)
        settings = Settings(steps=options.steps, seeds=1, device=options.device)
        units = list(range(BATCH_UNITS))
        hooked = HookedModel(to_torch(model.repaired).to(options.device), node)  # the unchanged model
        contenders = {"onnxproxy": proxygrad_run(target, units, settings),
                      "lucent": lucent_style_run(hooked, target.input_shape, units, settings.steps, settings.lr,
                                                 options.device)}
        median = interleaved(contenders, max(3, options.repeats // 8), options.clock)
        per_minute = {name: 60 * BATCH_UNITS / seconds for name, seconds in median.items()}
        rows.append([label, per_minute["onnxproxy"], per_minute["lucent"],
                     per_minute["onnxproxy"] / per_minute["lucent"]])
    return table(["model, layer", "onnxproxy units/min", "Lucent-style units/min", "ratio (goal >= 3)"], rows)


def validation_share(options) -> str:
    """maximize_units as the CLI runs it, with its onnxruntime validation timed from inside."""
    model, node, target = _target(DIGITS, "conv3", options.device)
    objective = choose_objective(None, node.shape, None)
    settings = Settings(device=options.device, steps=options.validation_steps)
    validating = []
    original = maximize.rescore_and_validate

    def timed(*args, **kwargs):
        began = options.clock()
        original(*args, **kwargs)
        validating.append(options.clock() - began)

    maximize.rescore_and_validate = timed
    try:
        totals = []
        for _ in range(3):
            began = options.clock()
            maximize.maximize_units(target, objective, list(range(BATCH_UNITS)), ["proxygrad"], settings)
            totals.append(options.clock() - began)
    finally:
        maximize.rescore_and_validate = original
    total, validation = statistics.median(totals), statistics.median(validating)
    return table(["run (default seeds)", "whole run s", "validation s", "share (goal <= 5%)"],
                 [[f"digits_cnn conv3, {BATCH_UNITS} units x {settings.seeds} seeds x {settings.steps} steps",
                   total, validation, f"{100 * validation / total:.1f}%"]])


def command_line(options) -> str:
    executable = shutil.which("onnxproxy") or f"{sys.executable} -m onnxproxy"
    rows = []
    for label, arguments, repeats in (("onnxproxy --help", ["--help"], 5),
                                      ("onnxproxy maximize (embedded model, defaults)", None, 1)):
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as folder:
                command = executable.split() + (arguments or ["maximize", "--quiet", "--out", f"{folder}/run"])
                began = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                times.append(time.perf_counter() - began)
        rows.append([label, statistics.median(times), repeats])
    return table(["command", "wall s (median)", "runs"], rows)


SECTIONS = {"Dual-slope overhead (step time, proxy / plain ReLU, batch 16)": dual_slope_overhead,
            "Graph cutting (cifar10_resnet_4b proxy, step time, cut graph / whole graph with a forward hook)":
                graph_cutting,
            "Batching (digits_cnn conv3)": batching,
            "Against a Lucent-style loop (same steps, Adam, one unit at a time, full model + hook)": against_lucent,
            "Validation share": validation_share,
            "Command line": command_line}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and steps: a smoke run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on 2 shared cores, 2 threads were 5-15x slower)")
    options = parser.parse_args()
    options.repeats, options.steps = (5, 16) if options.quick else (21, 64)
    options.validation_steps = 32 if options.quick else Settings.steps
    torch.set_num_threads(options.threads)
    # this process's CPU time on the CPU device: steadier than wall time while others share the cores
    options.clock = CLOCKS["cpu" if options.device == "cpu" else "wall"]
    print(f"torch {torch.__version__}, device {options.device}, {options.threads} thread(s), "
          f"{os.cpu_count()} CPUs visible; medians of interleaved repetitions, "
          f"{'process CPU' if options.device == 'cpu' else 'wall'} time (command line: wall time)")
    for title, measure in SECTIONS.items():
        began = time.perf_counter()
        print(f"\n### {title}\n\n{measure(options)}\n\n({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
