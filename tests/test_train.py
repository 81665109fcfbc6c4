"""`onnxproxy train`: ProxyGrad changes weight updates exactly where rectifier inputs are negative, the exported
model keeps the original ops and onnxruntime confirms its accuracy, bad data gives one clear error."""

import csv
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cli import main
from onnxproxy import graph, train
from onnxproxy.proxy import DOMAIN
from tests.conftest import DEFAULT_MODEL

CLASSES = 10


class TinyClassifier(nn.Module):
    """Linear -> Relu -> Linear -> Softmax, with the identity as first layer so that the signs of the rectifier's
    inputs are the signs of the input features."""

    def __init__(self):
        super().__init__()
        self.hidden, self.relu, self.logits = nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.eye(3))
            self.hidden.bias.zero_()
            self.logits.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.7, -0.4]]))

    def forward(self, x):
        return torch.softmax(self.logits(self.relu(self.hidden(x))), dim=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(TinyClassifier(), torch.zeros(1, 3), path, dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["probabilities"], dynamic_axes={"x": {0: "N"}})
    return graph.load_model(path)


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    """A few of the embedded model's held-out images as training and test files."""
    folder = tmp_path_factory.mktemp("digits")
    data = np.load(DEFAULT_MODEL.parent / "digits_heldout.npz")
    np.savez(folder / "train.npz", x=data["x"][:64], y=data["y"][:64])
    np.savez(folder / "test.npz", x=data["x"][64:96], y=data["y"][64:96])
    return folder


def settings(**changes):
    values = dict(epochs=1, batch_size=64, lr=0.1, optimizer="sgd", backward_slope=0.5, method="compare", seeds=1,
                  val_split=0.0, reinit=False)
    return train.TrainSettings(**{**values, **changes})


def one_step_updates(model, x, method):
    """The weight change of one SGD step on the whole batch, by ONNX initializer name."""
    network = train.build_network(model, train.find_logits(model, None), backward_slope=0.5)
    start = train.initial_state(network, None)
    data = train.Data(np.asarray(x, np.float32), np.array([0, 1]))
    run = train.train_run(network, start, data, None, settings(batch_size=len(x)), method, seed=0)
    return {source.initializer: (run.best_state[key] - start[key]).numpy() for key, source in network.sources.items()}


def test_logits_are_found_before_the_final_softmax(tiny_model):
    logits = train.find_logits(tiny_model, None)
    assert logits.op_type == "Gemm" and logits.shape[1] == 2


def test_proxygrad_step_equals_standard_step_when_no_rectifier_input_is_negative(tiny_model):
    x = [[1.0, 2.0, 3.0], [2.0, 1.0, 1.0]]
    standard, proxygrad = (one_step_updates(tiny_model, x, method) for method in train.METHODS)
    for name in standard:
        np.testing.assert_array_equal(proxygrad[name], standard[name], err_msg=name)


def test_proxygrad_step_differs_exactly_where_rectifier_inputs_are_negative(tiny_model):
    x = [[1.0, 2.0, -1.0], [2.0, 1.0, 3.0]]  # only hidden unit 2 has a negative input (sample 0)
    standard, proxygrad = (one_step_updates(tiny_model, x, method) for method in train.METHODS)
    for name in ("hidden.weight", "hidden.bias"):
        np.testing.assert_array_equal(proxygrad[name][:2], standard[name][:2], err_msg=name)
        assert not np.allclose(proxygrad[name][2], standard[name][2]), name
    for name in ("logits.weight", "logits.bias"):  # no rectifier lies between these and the loss
        np.testing.assert_array_equal(proxygrad[name], standard[name], err_msg=name)


def test_reinit_changes_the_weights_reproducibly(tiny_model):
    network = train.build_network(tiny_model, train.find_logits(tiny_model, None), backward_slope=0.5)
    from_file, first, again, other = (train.initial_state(network, seed) for seed in (None, 1, 1, 2))
    for key in from_file:
        assert not torch.equal(first[key], from_file[key]), key
        assert torch.equal(first[key], again[key]), key
        assert not torch.equal(first[key], other[key]), key


def conv_norm_gemm_model(path):
    """Conv -> BatchNormalization -> Relu -> Flatten -> Gemm with an untransposed, scaled weight: every way
    onnx2torch holds a weight differently from its initializer."""
    rng = np.random.default_rng(0)
    weights = {"w": (2, 1, 3, 3), "b": (2,), "scale": (2,), "shift": (2,), "mean": (2,), "var": (2,),
               "fc_w": (32, 3), "fc_b": (3,)}
    initializers = [onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, shape).astype(np.float32), name)
                    for name, shape in weights.items()]
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w", "b"], ["conv"], "conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("BatchNormalization", ["conv", "scale", "shift", "mean", "var"], ["norm"], "norm"),
        onnx.helper.make_node("Relu", ["norm"], ["relu"], "relu"),
        onnx.helper.make_node("Flatten", ["relu"], ["flat"], "flat"),
        onnx.helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], "fc", alpha=2.0, beta=0.5),
    ]
    model_graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])], initializers)
    onnx.save(onnx.helper.make_model(model_graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), path)
    return path


def test_export_writes_each_trained_tensor_back_where_onnx2torch_took_it_from(tmp_path):
    model = graph.load_model(conv_norm_gemm_model(tmp_path / "model.onnx"))
    network = train.build_network(model, train.find_logits(model, None), backward_slope=0.5)
    with torch.no_grad():  # stand-in for training: new values for every tensor, running variances positive
        for tensor in network.module.state_dict().values():
            tensor.copy_(torch.rand_like(tensor.float()) + 0.1)
    x = np.random.default_rng(1).standard_normal((5, 1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        expected = network.module.eval()(torch.from_numpy(x)).numpy()
    exported = train.export_trained(model.repaired, network.module.state_dict(), network.sources)
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def run_cli(*args):
    result = CliRunner().invoke(main, ["train", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def initializers(path):
    return {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in onnx.load(path).graph.initializer}


def test_compare_exports_original_ops_that_onnxruntime_scores_as_torch_did(digits_data, tmp_path):
    # Backward slope 0 is Relu's own slope, so both methods must train the very same weights.
    result = run_cli(DEFAULT_MODEL, "--data", digits_data / "train.npz", "--test-data", digits_data / "test.npz",
                     "--reinit", "--method", "compare", "--seeds", 2, "--backward-slope", 0, "--val-split", 0.25,
                     "--epochs", 1, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    test = np.load(digits_data / "test.npz")
    original_ops = Counter(node.op_type for node in onnx.load(DEFAULT_MODEL).graph.node)
    for record in document["runs"]:
        path = tmp_path / "out" / record["model"]
        exported = onnx.load(path)
        assert Counter(node.op_type for node in exported.graph.node) == original_ops
        assert not any(node.domain == DOMAIN for node in exported.graph.node)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": test["x"]})
        assert (logits.argmax(axis=1) == test["y"]).mean() == record["accuracy"]
    first, second = (initializers(tmp_path / "out" / f"{method}-seed0.onnx") for method in train.METHODS)
    reseeded = initializers(tmp_path / "out" / "standard-seed1.onnx")
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert not np.array_equal(first["conv1.weight"], reseeded["conv1.weight"])
    with open(tmp_path / "out" / "log.csv") as file:
        assert len(list(csv.DictReader(file))) == 4
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_ctrl_c_saves_a_checkpoint_and_the_best_model_so_far(digits_data, tmp_path, monkeypatch):
    original_epoch = train.train_epoch
    calls = []

    def interrupted_on_second_epoch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_epoch(*args)

    monkeypatch.setattr(train, "train_epoch", interrupted_on_second_epoch)
    result = run_cli(DEFAULT_MODEL, "--data", digits_data / "train.npz", "--method", "proxygrad", "--epochs", 3,
                     "--val-split", 0.25, "-o", tmp_path / "best.onnx", "--out", tmp_path / "out")
    assert result.exit_code == 130, result.output
    assert torch.load(tmp_path / "out" / "checkpoint.pt")["epochs_done"] == 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["best_epoch"] == 1
    assert (tmp_path / "best.onnx").read_bytes() == (tmp_path / "out" / "proxygrad-seed0.onnx").read_bytes()


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_csv(path):
    path.write_text("x,y\n1,2\n")
    return path


def good_x(count=4):
    return np.zeros((count, 1, 32, 32), np.float32)


BAD_DATA = {
    "not an npz": (write_csv, "not a readable .npz"),
    "missing y": (lambda path: write_npz(path, x=good_x()), "missing array y"),
    "wrong x shape": (lambda path: write_npz(path, x=np.zeros((4, 8, 8), np.float32), y=np.zeros(4, np.int64)),
                      "x has shape [4, 8, 8], but the model input 'image' takes [N, 1, 32, 32]"),
    "labels out of range": (lambda path: write_npz(path, x=good_x(), y=np.array([0, 1, 2, CLASSES])),
                            "labels must lie in 0..9"),
    "float labels": (lambda path: write_npz(path, x=good_x(), y=np.zeros(4)), "y must be 4 integer labels"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_files_give_one_clear_error(case, tmp_path):
    make, message = BAD_DATA[case]
    path = make(tmp_path / "data.npz")
    result = run_cli(DEFAULT_MODEL, "--data", path, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error:")


def test_o_with_several_runs_is_refused(digits_data, tmp_path):
    result = run_cli(DEFAULT_MODEL, "--data", digits_data / "train.npz", "--method", "compare",
                     "-o", tmp_path / "model.onnx")
    assert result.exit_code == 2 and "-o needs a single trained model" in result.output
