"""Which scalar to maximize for a unit of a target tensor: a channel's mean, one neuron, or a logit.

One implementation serves torch (during optimization) and numpy (validating with onnxruntime's tensors):
both index a batch of rows with python lists, so the same code computes the same number in both.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxproxy.errors import UserError

KINDS = ("channel", "neuron", "logit")


@dataclass(frozen=True)
class Objective:
    kind: str
    position: tuple[int, ...] | None = None  # for "neuron" on tensors with spatial axes

    def values(self, tensor, units: list[int]):
        """The objective for row i of `tensor` (batch first) and unit units[i]; one value per row."""
        rows = list(range(len(units)))
        selected = tensor[rows, units]  # the unit's channel (or the unit itself for 2-D tensors), per row
        if self.kind == "channel":
            return selected.reshape(len(units), -1).mean(1)
        if self.kind == "neuron" and self.position:
            return tensor[(rows, units) + tuple([axis] * len(units) for axis in self.position)]
        return selected


def choose_objective(kind: str | None, shape: list, position: tuple[int, ...] | None) -> Objective:
    """Default: channel mean for tensors with spatial axes, the unit itself for (N, K) tensors."""
    if len(shape) < 2:
        raise UserError(f"the target tensor has shape {shape}; it needs a batch and a unit axis")
    spatial = shape[2:]
    if kind is None:
        kind = "channel" if spatial else "logit"
    if kind == "logit" and spatial:
        raise UserError(f"--objective logit needs a (N, K) tensor; this one has shape {shape} (use channel or neuron)")
    if kind != "neuron" or not spatial:
        if position is not None:
            raise UserError("--position applies only to --objective neuron on a tensor with spatial axes")
        return Objective(kind)
    if position is None:
        position = tuple(size // 2 for size in spatial)  # the centre
    if len(position) != len(spatial):
        raise UserError(f"--position needs {len(spatial)} coordinates for shape {shape}")
    for axis, (index, size) in enumerate(zip(position, spatial)):
        if not 0 <= index < size:
            raise UserError(f"--position coordinate {axis} is {index}; the tensor's size there is {size}")
    return Objective(kind, tuple(position))


def parse_units(spec: str | None, count: int) -> list[int]:
    """`12`, `0-15`, `0,3,7`, `all` into unit indices (in the order given, without repeats), checked against
    the unit count."""
    if spec is None:
        return [0]
    spec = spec.strip()
    if spec == "all":
        return list(range(count))
    units = []
    for part in spec.split(","):
        units.extend(_unit_range(part, spec))
    outside = [unit for unit in units if not 0 <= unit < count]
    if outside:
        raise UserError(f"unit {outside[0]} is out of range: the target has {count} units (0-{count - 1})")
    return list(dict.fromkeys(units))


def _unit_range(part: str, spec: str) -> range:
    first, dash, last = part.partition("-")
    try:
        first, last = int(first), int(last) if dash else int(first)
    except ValueError:
        raise UserError(f"units '{spec}': expected N, A-B, A,B,C or all") from None
    if last < first:
        raise UserError(f"units '{spec}': the range {part.strip()} is empty (write A-B with A <= B)")
    return range(first, last + 1)


def looks_like_units(text: str) -> bool:
    return text == "all" or (bool(text) and all(part.replace("-", "", 1).isdigit() for part in text.split(",")))
