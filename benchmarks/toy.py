"""Toy functions where the backward slope decides what gradient ascent finds: small ReLU + linear maps of a
2-D input in the box [-1,1]^2, built from onnxproxy's own dual-slope op and optimized by onnxproxy's own loop
(`maximize.optimize`), so the tests exercise the real code. Shared by tests/test_toy_functions.py and the docs
figure; draw the figure by hand (matplotlib is a docs-only dependency):

    python benchmarks/toy.py docs/figures/toy_paths.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from onnxproxy.maximize import optimize
from onnxproxy.objectives import Objective
from onnxproxy.proxy import DualSlope
from onnxproxy.settings import Settings

BOX = (-1.0, 1.0)


class ToyFunction(nn.Module):
    """f(x) = x @ linear + sum_k weight_k * relu(x @ hidden_k + bias_k), one output (a 'logit')."""

    def __init__(self, hidden: list[tuple[float, float]], biases: list[float], weights: list[float],
                 linear: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.hidden = nn.Linear(2, len(hidden))
        self.out = nn.Linear(len(hidden), 1, bias=False)
        self.skip = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor(hidden))
            self.hidden.bias.copy_(torch.tensor(biases))
            self.out.weight.copy_(torch.tensor([weights]))
            self.skip.weight.copy_(torch.tensor([linear]))
        self.rectifier = DualSlope("toy_relu", "Relu", 0.0, None)
        self.requires_grad_(False)

    def forward(self, x):
        return self.out(self.rectifier(self.hidden(x))) + self.skip(x)


def dead_region() -> ToyFunction:
    """f = relu(x1) + 3 relu(2 x2 - 1): no gradient along x2 below x2 = 0.5, so plain ascent never finds the
    3 relu term and stops at the local maximum x1 = 1 (f = 1); the global maximum is f(1, 1) = 4."""
    return ToyFunction(hidden=[(1.0, 0.0), (0.0, 2.0)], biases=[0.0, -1.0], weights=[1.0, 3.0])


def wrong_way() -> ToyFunction:
    """f = x1 + x2 - 6 relu(x1 + x2 - 2.5): the ReLU is dead everywhere in the box (x1 + x2 <= 2), so f is
    linear with its maximum f(1, 1) = 2. Its phantom backward-slope gradient -6 b (1, 1) outweighs the true
    one (1, 1) once b > 1/6: b = 0.3 climbs down to the minimum f(-1, -1) = -2; b = 0.1 still rises."""
    return ToyFunction(hidden=[(1.0, 1.0)], biases=[-2.5], weights=[-6.0], linear=(1.0, 1.0))


TOYS = {"dead region": dead_region, "wrong way": wrong_way}
START = (0.2, -0.5)
STEPS = 100
LR = 0.05  # the paper's update x <- clip(x + lr * grad f(x))


class PathRecorder(nn.Module):
    """Records every input the optimization loop evaluates: one forward per step, so this is its path."""

    def __init__(self, function: nn.Module):
        super().__init__()
        self.function = function
        self.inputs: list[np.ndarray] = []

    def forward(self, x):
        self.inputs.append(x.detach().numpy().copy())
        return self.function(x)


@dataclass
class Ascent:
    best_value: float
    best_input: np.ndarray
    path: np.ndarray  # [steps + 1, 2]: the input at every step

    @property
    def final_input(self) -> np.ndarray:
        return self.path[-1]


def ascend(function: nn.Module, backward_slope: float | None, start=START, steps=STEPS, lr=LR,
           optimizer="sgd") -> Ascent:
    """onnxproxy's optimization loop on one toy function from one start; None = ordinary gradients."""
    recorder = PathRecorder(function)
    settings = Settings(steps=steps, lr=lr, optimizer=optimizer, seeds=1, input_range=BOX)
    trajectory = optimize(SimpleNamespace(module=recorder), Objective("logit"), [0],
                          torch.tensor([start], dtype=torch.float32), settings, backward_slope)
    return Ascent(float(trajectory.best_values[0]), trajectory.best_inputs[0], np.concatenate(recorder.inputs))


def value(function: nn.Module, point) -> float:
    with torch.no_grad():
        return float(function(torch.tensor(np.asarray(point, dtype=np.float32)[None]))[0, 0])


def gradient(function: nn.Module, point, backward_slope: float | None) -> np.ndarray:
    function.rectifier.backward_slope = backward_slope
    x = torch.tensor(np.asarray(point, dtype=np.float32)[None], requires_grad=True)
    (grad,) = torch.autograd.grad(function(x).sum(), x)
    return grad[0].numpy()


def projected_gradient(function: nn.Module, point, backward_slope: float | None) -> np.ndarray:
    """The gradient without the components that would leave the box: zero at a (local) maximum in the box."""
    grad = gradient(function, point, backward_slope)
    point = np.asarray(point)
    leaving = ((point >= BOX[1]) & (grad > 0)) | ((point <= BOX[0]) & (grad < 0))
    return np.where(leaving, 0.0, grad)


def grid(function: nn.Module, points: int = 201) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """f on a points x points grid of the box (the grid contains the corners)."""
    axis = np.linspace(*BOX, points, dtype=np.float32)
    x1, x2 = np.meshgrid(axis, axis)
    inputs = torch.from_numpy(np.stack([x1.ravel(), x2.ravel()], axis=1))
    with torch.no_grad():
        values = function(inputs)[:, 0].numpy().reshape(x1.shape)
    return x1, x2, values


def grid_maximum(function: nn.Module) -> float:
    return float(grid(function)[2].max())


FIGURE_RUNS = {"dead region": {"vanilla": None, "ProxyGrad b=0.3": 0.3},
               "wrong way": {"vanilla": None, "ProxyGrad b=0.3": 0.3, "ProxyGrad b=0.1": 0.1}}


def draw(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TOYS), figsize=(5.2 * len(TOYS), 4.6))
    for axis, (name, make) in zip(axes, TOYS.items()):
        function = make()
        x1, x2, values = grid(function)
        contours = axis.contourf(x1, x2, values, levels=24, cmap="viridis")
        figure.colorbar(contours, ax=axis, label="f(x)")
        for (label, slope), style in zip(FIGURE_RUNS[name].items(), ("w-o", "r-o", "C1--")):
            ascent = ascend(function, slope)
            axis.plot(ascent.path[:, 0], ascent.path[:, 1], style, markersize=2.5, linewidth=1.2,
                      label=f"{label}: best f = {ascent.best_value:.2f}")
        axis.plot(*START, "k*", markersize=12, label="start")
        axis.set(title=f"{name}: {function_formula(name)}", xlabel="x1", ylabel="x2", xlim=BOX, ylim=BOX)
        axis.legend(loc="upper left", fontsize=8, framealpha=0.85)
    figure.suptitle(f"gradient ascent x <- clip(x + {LR} grad f), {STEPS} steps, onnxproxy's dual-slope ReLU")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def function_formula(name: str) -> str:
    return {"dead region": "relu(x1) + 3 relu(2 x2 - 1)", "wrong way": "x1 + x2 - 6 relu(x1 + x2 - 2.5)"}[name]


def main():
    parser = argparse.ArgumentParser(description="Draw the toy functions with vanilla and ProxyGrad paths.")
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/figures/toy_paths.png"))
    arguments = parser.parse_args()
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    draw(arguments.out)
    for name, make in TOYS.items():
        function = make()
        results = ", ".join(f"{label} {ascend(function, slope).best_value:.3f}"
                            for label, slope in FIGURE_RUNS[name].items())
        print(f"{name}: grid maximum {grid_maximum(function):.3f}; {results}")


if __name__ == "__main__":
    main()
