"""The optimization loop on the embedded model: keep-best by the true activation, the proxy's forward is the
original network's, both methods start from the same inputs, and validation catches a wrong torch value."""

import numpy as np
import pytest
import torch

from conftest import DEFAULT_MODEL
from onnxproxy import graph, maximize
from onnxproxy.maximize import maximize_units, prepare_target, rescore_and_validate
from onnxproxy.objectives import choose_objective
from onnxproxy.settings import Settings
from onnxproxy.validate import TensorScorer

SLOPE = 0.3


def prepared(node="conv3"):
    model = graph.load_model(DEFAULT_MODEL)
    target = prepare_target(model, graph.resolve_node(model, node), SLOPE, "cpu")
    return target, choose_objective(None, target.shape, None)


@pytest.fixture(scope="module")
def digits():
    return prepared()


def recording_inputs(module) -> list[torch.Tensor]:
    """Every batch fed to `module` from now on."""
    seen = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    return seen


def test_reported_activation_is_the_best_true_activation_over_all_steps():
    target, objective = prepared()
    units, seeds, steps = [0, 1], 2, 12
    row_units = [unit for unit in units for _ in range(seeds)]
    seen = recording_inputs(target.module)
    # A huge sgd step makes the activation jump around, so the best step is often not the last one.
    settings = Settings(steps=steps, lr=1000.0, optimizer="sgd", seeds=seeds)
    results, _ = maximize_units(target, objective, units, ["proxygrad"], settings)

    steps_seen = [batch for batch in seen if batch.shape[0] == len(row_units)]
    assert len(steps_seen) == steps + 1
    scorer = TensorScorer(target.model.original, target.model.input.name, target.tensor)  # the unchanged model
    true_values = np.stack([objective.values(scorer(batch.numpy()), row_units) for batch in steps_seen])
    assert (true_values.argmax(0) < steps).any(), "precondition: some row's best step is not its last"
    for index, result in enumerate(results):
        rows = true_values[:, index * seeds:(index + 1) * seeds]
        best_step, best_seed = np.unravel_index(rows.argmax(), rows.shape)
        assert (result.best_step, result.seed_index) == (best_step, best_seed)
        assert result.onnxruntime_activation == pytest.approx(rows.max(), rel=1e-6)
        assert result.activation == pytest.approx(rows.max(), rel=1e-5, abs=1e-5)
        assert result.initial_activation == pytest.approx(rows[0, best_seed], rel=1e-5, abs=1e-5)
        assert result.validated


def test_proxy_forward_is_the_unchanged_models_forward(digits):
    target, objective = digits
    inputs = torch.rand([6] + target.input_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scorer = TensorScorer(target.model.original, target.model.input.name, target.tensor)
    with torch.no_grad():
        proxy_output = target.module(inputs).numpy()
    np.testing.assert_allclose(proxy_output, scorer(inputs.numpy()), atol=1e-5, rtol=1e-5)


def test_the_proxy_changes_the_gradient_not_the_value(digits):
    target, objective = digits
    x = torch.rand([1] + target.input_shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    values, gradients = [], []
    for slope in (None, SLOPE):
        maximize.proxy.set_backward_slope(target.module, slope)
        value = objective.values(target.module(x), [0])
        (gradient,) = torch.autograd.grad(value.sum(), x)
        values.append(value.detach())
        gradients.append(gradient)
    assert torch.equal(values[0], values[1])
    assert not torch.allclose(gradients[0], gradients[1])


@pytest.fixture
def optimize_calls(monkeypatch):
    """Every call of maximize.optimize: (backward_slope, row_units, start, trajectory)."""
    calls = []
    original_optimize = maximize.optimize

    def spy(target, objective, row_units, start, settings, backward_slope, progress=None):
        trajectory = original_optimize(target, objective, row_units, start, settings, backward_slope, progress)
        calls.append((backward_slope, row_units, start.clone(), trajectory))
        return trajectory

    monkeypatch.setattr(maximize, "optimize", spy)
    return calls


def test_compare_runs_both_methods_from_the_same_starts(digits, optimize_calls):
    target, objective = digits
    settings = Settings(steps=3, lr=0.05, optimizer="sgd", seeds=2)
    results, _ = maximize_units(target, objective, [0, 5], ["vanilla", "proxygrad"], settings)

    (vanilla_slope, _, vanilla_start, vanilla), (proxy_slope, _, proxy_start, proxied) = optimize_calls
    vanilla_initial, proxy_initial = vanilla.initial_values, proxied.initial_values
    assert vanilla_slope is None
    assert [proxy_slope(step) for step in (0, 1, 2)] == [SLOPE, SLOPE * (1 - 1 / 1.5), None]  # decays by mid-run
    assert torch.equal(vanilla_start, proxy_start)
    np.testing.assert_array_equal(vanilla_initial, proxy_initial)
    assert [(result.unit, result.method) for result in results] == [
        (0, "vanilla"), (0, "proxygrad"), (5, "vanilla"), (5, "proxygrad")]


def test_validation_catches_a_wrong_torch_value():
    target, objective = prepared()
    settings = Settings(steps=2, seeds=1)
    results, _ = maximize_units(target, objective, [0, 1], ["proxygrad"], settings)
    assert all(result.validated for result in results)

    last_conv = [module for module in target.module.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.bias += 0.5  # torch now disagrees with the unchanged model by 0.5 on every unit
    rescore_and_validate(target, objective, results, settings)
    assert not any(result.validated for result in results)
    for result in results:
        assert result.activation - result.onnxruntime_activation == pytest.approx(0.5, abs=1e-4)


def test_same_seed_same_starts_other_seed_other_starts():
    settings = Settings(seed=7)
    first = maximize.starting_inputs([1, 4, 4], 3, settings)
    assert torch.equal(first, maximize.starting_inputs([1, 4, 4], 3, settings))
    assert not torch.equal(first, maximize.starting_inputs([1, 4, 4], 3, Settings(seed=8)))
    assert first.min() >= -1 and first.max() <= 1


def test_slope_schedules():
    constant = maximize.slope_schedule(Settings(steps=10, backward_slope=0.4, slope_schedule="constant"))
    decay = maximize.slope_schedule(Settings(steps=10, backward_slope=0.4, slope_schedule="decay"))
    assert [constant(step) for step in (0, 5, 9)] == [0.4, 0.4, 0.4]
    assert decay(0) == 0.4 and decay(4) == pytest.approx(0.4 * (1 - 4 / 5))
    assert decay(5) is None and decay(9) is None  # the ordinary gradient from mid-run on


def test_portfolio_splits_each_units_seeds_between_vanilla_and_proxygrad(digits, optimize_calls):
    target, objective = digits
    settings = Settings(steps=4, lr=0.05, optimizer="adam", seeds=4, proxygrad_seeds=1)
    start = maximize.starting_inputs(target.input_shape, 2 * settings.seeds, settings)
    results, _ = maximize_units(target, objective, [0, 5], ["portfolio"], settings, start=start)

    (vanilla_slope, vanilla_units, vanilla_start, vanilla), (proxy_slope, proxy_units, proxy_start, proxied) = optimize_calls
    vanilla_best, proxy_best = vanilla.best_values, proxied.best_values
    assert vanilla_slope is None and callable(proxy_slope)
    assert vanilla_units == [0, 0, 0, 5, 5, 5] and proxy_units == [0, 5]
    assert torch.equal(vanilla_start, start[[0, 1, 2, 4, 5, 6]]) and torch.equal(proxy_start, start[[3, 7]])
    for index, result in enumerate(results):
        halves = {"vanilla": vanilla_best[3 * index:3 * index + 3], "proxygrad": proxy_best[index:index + 1]}
        best_half = max(halves, key=lambda half: halves[half].max())
        assert result.method == "portfolio" and result.won_by == best_half
        assert result.activation == pytest.approx(float(halves[best_half].max()), rel=1e-5)


def test_a_portfolio_with_as_many_proxygrad_seeds_as_seeds_is_proxygrad(digits):
    target, objective = digits
    settings = Settings(steps=3, lr=0.05, optimizer="adam", seeds=2, proxygrad_seeds=2)
    (portfolio,), _ = maximize_units(target, objective, [1], ["portfolio"], settings)
    (proxygrad,), _ = maximize_units(target, objective, [1], ["proxygrad"], settings)
    assert portfolio.won_by == "proxygrad" and maximize.optimizations("portfolio", settings) == 1
    assert portfolio.activation == proxygrad.activation
