"""Settings of an activation-maximization run. Free of torch, so the CLI can show defaults fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnxproxy.errors import UserError

# Chosen by benchmarks/quality.py (docs/benchmarks.md): on real models the best measured setting was a portfolio
# (3 of 4 seeds vanilla Adam, 1 Adam with a backward slope of 0.3 decaying to the forward slope by mid-run).
# The proxy ONNX files keep the constant slope as their attribute default.
DEFAULT_BACKWARD_SLOPE = 0.3
METHODS = ("portfolio", "proxygrad", "vanilla")
SLOPE_SCHEDULES = ("decay", "constant")
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
OPTIMIZERS = ("sgd", "adam")


@dataclass
class Settings:
    steps: int = 256
    lr: float = 0.05
    optimizer: str = "adam"
    backward_slope: float = DEFAULT_BACKWARD_SLOPE
    slope_schedule: str = "decay"
    proxygrad_seeds: int = 1  # of each unit's seeds, in a portfolio (the others run vanilla)
    seeds: int = 4
    seed: int = 0
    input_range: tuple[float, float] = (-1.0, 1.0)
    device: str = "cpu"
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    def check(self):
        if self.steps <= 0:
            raise UserError(f"--steps must be positive, got {self.steps}")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr must be positive and finite, got {self.lr}")
        if not math.isfinite(self.backward_slope):
            raise UserError(f"--backward-slope must be finite, got {self.backward_slope}")
        for name, tolerance in (("--atol", self.atol), ("--rtol", self.rtol)):
            if not 0 <= tolerance < math.inf:
                raise UserError(f"{name} must be zero or positive and finite, got {tolerance}")
        if self.seeds <= 0:
            raise UserError(f"--seeds must be positive, got {self.seeds}")
        if self.proxygrad_seeds <= 0:
            raise UserError(f"--proxygrad-seeds must be positive, got {self.proxygrad_seeds}")
        low, high = self.input_range
        if not low < high:
            raise UserError(f"--input-range LO HI needs LO < HI, got {low} {high}")
        if self.slope_schedule not in SLOPE_SCHEDULES:
            raise UserError(f"--slope-schedule must be one of {', '.join(SLOPE_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
