"""Step-time overhead of the dual-slope op against plain torch ReLU on the same converted graph.

One step is what activation maximization does per iteration: forward and backward with respect to the input,
for a batch of 16. Both modules are onnx2torch conversions of the same repaired model, one of its proxy (dual-slope
ops), one of the unchanged model (plain ReLU). Repetitions alternate between the two so that changes in machine
load hit both alike; the ratio is the median of the per-repetition ratios, which a shared machine's drifting load
disturbs less than a ratio of medians. A timing, not a test: run it by hand.

    python benchmarks/dual_slope_overhead.py --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from onnxproxy.graph import load_model, to_torch
from onnxproxy.proxy import build_proxy

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "digits_cnn": ROOT / "models" / "digits_cnn.onnx",
    "cifar10_resnet_4b": ROOT.parent / "shared" / "models" / "cifar10_resnet_4b.onnx",
}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _frozen(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """Only the input gradient is needed, as in activation maximization."""
    module.requires_grad_(False)
    return module.to(device)


def _step(module, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(module(batch).sum(), batch)
    return gradient


def _seconds_per_step(module, batch: torch.Tensor, steps: int, clock) -> float:
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        _step(module, batch)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return (clock() - start) / steps


def compare(path: Path, device: str, batch_size: int, repeats: int, steps: int, clock) -> dict[str, float]:
    """Median seconds per step of the plain and the proxy module, measured in alternating repetitions, and the
    median ratio proxy / plain of the repetitions."""
    loaded = load_model(path)
    proxy_model, _ = build_proxy(loaded.repaired)
    modules = {"plain": _frozen(to_torch(loaded.repaired), device), "proxy": _frozen(to_torch(proxy_model), device)}
    batch = torch.randn(batch_size, *loaded.input.shape[1:], device=device)
    for module in modules.values():
        _seconds_per_step(module, batch, steps, clock)  # warm-up: allocator, kernels, lazy initialisation
    times = {name: [] for name in modules}
    for repeat in range(repeats):
        order = list(modules) if repeat % 2 == 0 else list(reversed(modules))
        for name in order:
            times[name].append(_seconds_per_step(modules[name], batch, steps, clock))
    medians = {name: statistics.median(values) for name, values in times.items()}
    medians["ratio"] = statistics.median(proxy / plain for proxy, plain in zip(times["proxy"], times["plain"]))
    return medians


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21, help="alternating repetitions per module")
    parser.add_argument("--steps", type=int, default=20, help="steps timed together in one repetition")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); 1 is steadiest "
                                                    "on a shared machine")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="cpu: this process's CPU time, steadier than wall time where other programs share the "
                             "CPU (CPU device only)")
    arguments = parser.parse_args()
    if arguments.clock == "cpu" and arguments.device != "cpu":
        parser.error("--clock cpu measures only the CPU device")
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    print(f"torch {torch.__version__}, device {arguments.device}, {torch.get_num_threads()} CPU threads, "
          f"batch {arguments.batch_size}, "
          f"median of {arguments.repeats} x {arguments.steps} steps, {arguments.clock} clock")
    print(f"{'model':20s} {'plain ReLU ms/step':>19s} {'dual-slope ms/step':>19s} {'ratio':>7s}")
    for name, path in MODELS.items():
        if not path.exists():
            print(f"{name:20s} skipped: {path} not present")
            continue
        median = compare(path, arguments.device, arguments.batch_size, arguments.repeats, arguments.steps,
                         CLOCKS[arguments.clock])
        print(f"{name:20s} {median['plain'] * 1e3:19.3f} {median['proxy'] * 1e3:19.3f} "
              f"{median['ratio']:7.3f}")


if __name__ == "__main__":
    main()
