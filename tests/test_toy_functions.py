"""Toy functions where the landscape decides what gradient ascent finds (benchmarks/toy.py): plain gradient
ascent provably stalls where ProxyGrad reaches the global maximum, and a too-high backward slope walks the
wrong way. Optimized by onnxproxy's own loop and dual-slope op; maxima checked against a grid search."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import toy  # noqa: E402


def test_grid_maxima_are_the_known_global_maxima():
    assert toy.grid_maximum(toy.dead_region()) == pytest.approx(4.0)
    assert toy.grid_maximum(toy.wrong_way()) == pytest.approx(2.0)


def test_vanilla_stalls_at_the_local_maximum_of_the_dead_region():
    function = toy.dead_region()
    vanilla = toy.ascend(function, backward_slope=None)
    local_maximum = (1.0, toy.START[1])  # x1 climbs to the box edge; x2 never moves
    np.testing.assert_allclose(vanilla.final_input, local_maximum)
    assert np.all(vanilla.path[:, 1] == toy.START[1])
    assert vanilla.best_value == pytest.approx(toy.value(function, local_maximum)) == pytest.approx(1.0)
    assert np.all(toy.projected_gradient(function, vanilla.final_input, None) == 0)
    assert toy.gradient(function, vanilla.final_input, None)[1] == 0  # dead: no gradient toward 3 relu(2 x2 - 1)


def test_proxygrad_reaches_the_global_maximum_of_the_dead_region():
    function = toy.dead_region()
    proxygrad = toy.ascend(function, backward_slope=0.3)
    np.testing.assert_allclose(proxygrad.best_input, (1.0, 1.0))
    assert proxygrad.best_value == pytest.approx(toy.grid_maximum(function))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_stall_and_its_escape_do_not_depend_on_the_optimizer(optimizer):
    function = toy.dead_region()
    assert toy.ascend(function, None, optimizer=optimizer).best_value == pytest.approx(1.0)
    assert toy.ascend(function, 0.3, optimizer=optimizer).best_value == pytest.approx(4.0)


def test_vanilla_finds_the_maximum_when_the_relu_is_dead_but_the_true_gradient_points_there():
    function = toy.wrong_way()
    vanilla = toy.ascend(function, backward_slope=None)
    np.testing.assert_allclose(vanilla.best_input, (1.0, 1.0))
    assert vanilla.best_value == pytest.approx(toy.grid_maximum(function))


def test_a_too_high_backward_slope_walks_down_to_the_minimum():
    function = toy.wrong_way()
    too_high = toy.ascend(function, backward_slope=0.3)
    np.testing.assert_allclose(too_high.final_input, (-1.0, -1.0))
    assert toy.value(function, too_high.final_input) == pytest.approx(-2.0)
    # every step lowered f, so the best input kept is the start: keep-best guards, it cannot repair
    assert too_high.best_value == pytest.approx(toy.value(function, toy.START))
    assert np.all(toy.gradient(function, toy.START, 0.3) < 0) and np.all(toy.gradient(function, toy.START, None) > 0)


def test_a_low_backward_slope_still_rises_on_the_same_function():
    function = toy.wrong_way()
    assert toy.ascend(function, backward_slope=0.1).best_value == pytest.approx(toy.grid_maximum(function))
