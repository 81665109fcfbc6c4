"""Objectives (channel mean, neuron, logit) give the same numbers in torch and numpy; unit specs parse or
fail with a message that helps."""

import numpy as np
import pytest
import torch

from onnxproxy.errors import UserError
from onnxproxy.objectives import Objective, choose_objective, looks_like_units, parse_units

RNG = np.random.default_rng(0)
FEATURES = RNG.standard_normal((3, 5, 4, 6)).astype(np.float32)  # (N, C, H, W)
LOGITS = RNG.standard_normal((3, 7)).astype(np.float32)
UNITS = [4, 0, 2]  # one unit per row


def both(objective, tensor, units):
    """The objective evaluated on the numpy array and on the same data as a torch tensor."""
    return objective.values(tensor, units), objective.values(torch.from_numpy(tensor), units).numpy()


def test_channel_mean_is_the_mean_over_positions_of_each_rows_channel():
    numpy_values, torch_values = both(choose_objective(None, list(FEATURES.shape), None), FEATURES, UNITS)
    expected = [FEATURES[row, unit].mean() for row, unit in enumerate(UNITS)]
    np.testing.assert_allclose(numpy_values, expected, rtol=1e-6)
    np.testing.assert_allclose(torch_values, expected, rtol=1e-6)


def test_neuron_at_a_position():
    objective = choose_objective("neuron", list(FEATURES.shape), (1, 5))
    numpy_values, torch_values = both(objective, FEATURES, UNITS)
    expected = [FEATURES[row, unit, 1, 5] for row, unit in enumerate(UNITS)]
    np.testing.assert_array_equal(numpy_values, expected)
    np.testing.assert_array_equal(torch_values, expected)


def test_neuron_defaults_to_the_centre():
    objective = choose_objective("neuron", list(FEATURES.shape), None)
    assert objective.position == (2, 3)
    numpy_values, torch_values = both(objective, FEATURES, UNITS)
    expected = [FEATURES[row, unit, 2, 3] for row, unit in enumerate(UNITS)]
    np.testing.assert_array_equal(numpy_values, expected)
    np.testing.assert_array_equal(torch_values, expected)


@pytest.mark.parametrize("kind", [None, "logit", "neuron", "channel"])
def test_every_kind_on_a_2d_tensor_is_the_unit_itself(kind):
    objective = choose_objective(kind, list(LOGITS.shape), None)
    numpy_values, torch_values = both(objective, LOGITS, [6, 0, 3])
    expected = [LOGITS[0, 6], LOGITS[1, 0], LOGITS[2, 3]]
    np.testing.assert_array_equal(numpy_values, expected)
    np.testing.assert_array_equal(torch_values, expected)


def test_channel_is_the_default_for_spatial_tensors_and_logit_for_2d():
    assert choose_objective(None, [1, 8, 4, 4], None) == Objective("channel")
    assert choose_objective(None, [1, 10], None) == Objective("logit")


def test_torch_values_carry_the_gradient_of_each_rows_unit_only():
    tensor = torch.from_numpy(FEATURES).requires_grad_(True)
    Objective("channel").values(tensor, UNITS).sum().backward()
    touched = [(row, unit) for row in range(3) for unit in range(5) if tensor.grad[row, unit].abs().sum() > 0]
    assert touched == list(enumerate(UNITS))


@pytest.mark.parametrize("kind, shape, position, message", [
    ("logit", [1, 8, 4, 4], None, r"logit needs a \(N, K\) tensor"),
    ("neuron", [1, 8, 4, 4], (4, 0), "coordinate 0 is 4"),
    ("neuron", [1, 8, 4, 4], (1,), "needs 2 coordinates"),
    ("channel", [1, 8, 4, 4], (1, 1), "--position applies only"),
    (None, [8], None, "needs a batch and a unit axis"),
])
def test_objective_errors(kind, shape, position, message):
    with pytest.raises(UserError, match=message):
        choose_objective(kind, shape, position)


@pytest.mark.parametrize("spec, units", [
    (None, [0]), ("12", [12]), ("0-3", [0, 1, 2, 3]), ("0,3,7", [0, 3, 7]), ("5,1-2,5", [5, 1, 2]),
    (" 2 ", [2]), ("all", list(range(16))),
])
def test_parse_units(spec, units):
    assert parse_units(spec, 16) == units


def test_out_of_range_unit_names_the_channel_count():
    with pytest.raises(UserError, match="out of range: the target has 16 units"):
        parse_units("3,16", 16)


@pytest.mark.parametrize("spec, message", [
    ("x", "expected N, A-B"), ("-1", "expected N, A-B"), ("1-", "expected N, A-B"), ("", "expected N, A-B"),
    ("5-2", "range 5-2 is empty"),
])
def test_malformed_units(spec, message):
    with pytest.raises(UserError, match=message):
        parse_units(spec, 16)


def test_looks_like_units_tells_unit_suffixes_from_name_parts():
    assert all(looks_like_units(text) for text in ["0", "all", "0-7", "1,3,5", "0-3,8"])
    assert not any(looks_like_units(text) for text in ["", "0:1", "relu", "1.5", "a-b"])
