"""`onnxproxy audit`: small audits of the embedded model (files, summaries recomputed from the records,
interrupt + resume, workers) and of a generated model with a unit that can never be positive."""

import csv
import json
import statistics

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from cli import main
from onnxproxy import audit, graph
from onnxproxy.errors import UserError
from conftest import DEFAULT_MODEL, float_input, onnx_model, shared_model

SMALL = ["--units-per-node", "2", "--steps", "6", "--seeds", "2", "--device", "cpu", "--quiet"]


def run_audit_cli(out, *options, model=DEFAULT_MODEL):
    if not model.exists():
        pytest.skip(f"{model} not present yet")
    return CliRunner().invoke(main, ["audit", str(model), "--out", str(out), *options])


@pytest.fixture(scope="module")
def small_audit(tmp_path_factory):
    """An uninterrupted single-process audit of every default node, 2 units each."""
    out = tmp_path_factory.mktemp("audit") / "run"
    result = run_audit_cli(out, *SMALL)
    assert result.exit_code == 0, result.output
    return out, result.output


def load(out):
    return json.loads((out / "audit.json").read_text())


def test_writes_every_output_for_every_record(small_audit):
    out, printed = small_audit
    document = load(out)
    assert [node["node"] for node in document["nodes"]] == ["conv1", "conv2", "conv3", "fc", "logits"]
    assert document["validated"] is True
    inputs = np.load(out / "inputs.npz")
    for record in document["results"]:
        assert (out / record["image"]).stat().st_size > 0
        assert inputs[record["input"]].shape == (1, 1, 32, 32)
    assert (out / "report.html").stat().st_size > 0
    assert "logits" in printed and "Wrote" in printed


def test_summaries_agree_with_the_records(small_audit):
    document = load(small_audit[0])
    settings = document["settings"]
    for node in document["nodes"]:
        records = [record for record in document["results"] if record["tensor"] == node["tensor"]]
        value = {(record["unit"], record["method"]): record["onnxruntime_activation"] for record in records}
        units = sorted({record["unit"] for record in records})
        assert node["units_audited"] == len(units) == 2
        for method in ("vanilla", "proxygrad"):
            values = [value[unit, method] for unit in units]
            assert node[method]["median"] == pytest.approx(statistics.median(values))
            assert node[method]["mean"] == pytest.approx(statistics.fmean(values))
        gains = [value[unit, "proxygrad"] - value[unit, "vanilla"] for unit in units]
        assert node["median_gain"] == pytest.approx(statistics.median(gains))
        tolerance = [settings["atol"] + settings["rtol"] * abs(value[unit, "vanilla"]) for unit in units]
        assert node["proxygrad_higher"] == sum(gain > limit for gain, limit in zip(gains, tolerance))
        best = {unit: max(value[unit, "vanilla"], value[unit, "proxygrad"]) for unit in units}
        assert node["dead_units"] == [unit for unit in units if best[unit] <= 0]
    conv1 = document["nodes"][0]
    assert conv1["rectifiers_before"] == 0 and conv1["median_gain"] == 0  # nothing to rewrite before the first conv


def test_csv_has_one_row_per_unit_and_method(small_audit):
    out = small_audit[0]
    rows = list(csv.DictReader(open(out / "audit.csv")))
    assert len(rows) == len(load(out)["results"]) == 5 * 2 * 2
    assert len({(row["tensor"], row["unit"], row["method"]) for row in rows}) == len(rows)


def test_interrupted_then_resumed_equals_uninterrupted(small_audit, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    run_batch = audit.BatchAuditor.__call__

    def interrupt_after_two_batches(self, batch):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(batch)
        return run_batch(self, batch)

    monkeypatch.setattr(audit.BatchAuditor, "__call__", interrupt_after_two_batches)
    interrupted = run_audit_cli(out, *SMALL)
    assert interrupted.exit_code == 130 and "--resume" in interrupted.output
    assert not (out / "audit.json").exists()
    with open(out / audit.JOURNAL, "a") as journal:
        journal.write('{"tensor": "conv3", "unit": 0, "resul')  # a line cut off by a crash
    calls.clear()
    monkeypatch.setattr(audit.BatchAuditor, "__call__",
                        lambda self, batch: calls.append(batch) or run_batch(self, batch))
    resumed = run_audit_cli(out, *SMALL, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [batch.tensor for batch in calls] == ["conv3", "fc", "logits"]  # finished units are not redone
    assert load(out) == load(small_audit[0])


def test_an_existing_audit_is_only_resumed_with_its_settings(small_audit):
    out = small_audit[0]
    options = [option if option != "6" else "7" for option in SMALL]  # --steps 7
    refused = run_audit_cli(out, *options, "--resume")
    assert refused.exit_code == 2 and "steps: 6 there, 7 now" in refused.output
    not_resumed = run_audit_cli(out, *SMALL)
    assert not_resumed.exit_code == 2 and "--resume" in not_resumed.output


def test_two_workers_give_the_same_audit(small_audit, tmp_path):
    parallel = run_audit_cli(tmp_path / "run", *SMALL, "--workers", "2")
    assert parallel.exit_code == 0, parallel.output
    assert load(tmp_path / "run") == load(small_audit[0])


def dead_unit_model(path):
    """Conv with two output channels: channel 0 sums the input (positive for a bright input), channel 1 has
    zero weights and bias -1, so no input makes it positive."""
    weights = np.zeros((2, 1, 3, 3), np.float32)
    weights[0] = 1.0
    bias = np.array([0.0, -1.0], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["out"], name="relu")]
    model = onnx_model(nodes, [float_input("x", [1, 1, 8, 8])], [float_input("out", [1, 2, 8, 8])],
                       {"w": weights, "b": bias})
    onnx.save(model, path)
    return path


def test_a_unit_that_cannot_be_positive_is_dead(tmp_path):
    model = dead_unit_model(tmp_path / "dead.onnx")
    result = run_audit_cli(tmp_path / "run", "--nodes", "conv", "--units-per-node", "all", "--steps", "4",
                           "--seeds", "1", "--device", "cpu", "--quiet", model=model)
    assert result.exit_code == 0, result.output
    (node,) = load(tmp_path / "run")["nodes"]
    assert node["dead_units"] == [1]
    assert node["vanilla"]["median"] is not None


def test_default_nodes_are_pre_activations_and_logits():
    model = graph.load_model(shared_model("cifar10_resnet_2b.onnx"))
    names = [node.name for node in audit.default_nodes(model)]
    assert names == ["Conv_0", "Conv_2", "Add_6", "Conv_8", "Add_11", "Gemm_14", "Gemm_16"]


def test_units_are_spread_evenly():
    assert audit.spread_units(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert audit.spread_units(3, 8) == [0, 1, 2]
    assert audit.spread_units(10, 1) == [0]
    assert audit.spread_units(5, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("option, value", [("--units-per-node", "0"), ("--methods", "vanilla,magic"),
                                           ("--workers", "0"), ("--nodes", "no_such_layer")])
def test_bad_options_are_usage_errors(tmp_path, option, value):
    result = run_audit_cli(tmp_path / "run", *SMALL, option, value)
    assert result.exit_code == 2 and "Error:" in result.output and "Traceback" not in result.output


def test_a_unit_seed_depends_on_seed_tensor_and_unit_only():
    seeds = {audit.unit_seed(seed, tensor, unit) for seed in (0, 1) for tensor in ("a", "b") for unit in (0, 1)}
    assert len(seeds) == 8 and audit.unit_seed(0, "a", 1) == audit.unit_seed(0, "a", 1)
    with pytest.raises(UserError):
        audit.parse_units_per_node("many")
