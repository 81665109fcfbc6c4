"""Training a classifier's weights with ProxyGrad, and the standard way, from the same start.

The architecture (and, unless reinitialized, the weights) comes from the ONNX file; the module trained is the
proxy graph cut at the logits: its forward is the original network, its backward uses the dual slopes.
Standard training is the same module with ordinary gradients, from identical initial weights and data order.
The trained weights are written back into the repaired ONNX graph's initializers, so the exported model keeps
its original rectifiers, and onnxruntime re-scores it on the evaluation data.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm import tqdm

from onnxproxy import graph, proxy, report
from onnxproxy.errors import UserError
from onnxproxy.settings import OPTIMIZERS
from onnxproxy.validate import TensorScorer

METHODS = ("standard", "proxygrad")
SGD_MOMENTUM = 0.9
PRELU_INITIAL_SLOPE = 0.25  # what torch's nn.PReLU starts from
SPLIT_SEED = 0  # one validation split for every seed and method
EVAL_BATCH = 512


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    backward_slope: float
    method: str  # one of METHODS or "compare"
    seeds: int
    val_split: float
    reinit: bool

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.method == "compare" else (self.method,)

    def check(self):
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--seeds", self.seeds)):
            if value <= 0:
                raise UserError(f"{option} must be positive, got {value}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.val_split < 1:
            raise UserError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.method not in METHODS + ("compare",):
            raise UserError(f"--method must be one of {', '.join(METHODS)} or compare")


@dataclass
class Request:
    model: Path
    data: Path
    test_data: Path | None
    node: str | None
    settings: TrainSettings
    onnx_out: Path | None
    out: Path | None
    force: bool
    input_shapes: dict = field(default_factory=dict)
    input_name: str | None = None


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    x: np.ndarray  # float32, the model's input layout
    y: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices) -> Data:
        return Data(self.x[indices], self.y[indices])


def load_data(path: Path, model_input: graph.TensorInfo, classes: int) -> Data:
    """An .npz with `x` in the model's input layout and integer labels `y` in [0, classes)."""
    arrays = _read_npz(path)
    x, y = arrays["x"], arrays["y"]
    expected = list(model_input.shape[1:])
    if x.ndim != len(model_input.shape) or list(x.shape[1:]) != expected:
        raise UserError(f"{path}: x has shape {list(x.shape)}, but the model input '{model_input.name}' takes "
                        f"[N, {', '.join(map(str, expected))}]")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{path}: x must hold numbers, got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{path}: y must be {len(x)} integer labels (one per row of x), got dtype {y.dtype} "
                        f"shape {list(y.shape)}")
    if len(y) == 0:
        raise UserError(f"{path}: no samples")
    if y.min() < 0 or y.max() >= classes:
        raise UserError(f"{path}: labels must lie in 0..{classes - 1} (the model has {classes} logits), "
                        f"got {y.min()}..{y.max()}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: x holds NaN or infinite values")
    return Data(x, y.astype(np.int64))


def _read_npz(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError or zipfile errors by kind of damage
        raise UserError(f"{path}: not a readable .npz file ({type(error).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: a single .npy array, expected an .npz archive with arrays x and y")
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise UserError(f"{path}: missing array {' and '.join(missing)} (found: "
                            f"{', '.join(archive.files) or 'none'}); expected x (inputs) and y (integer labels)")
        try:
            return {key: archive[key] for key in ("x", "y")}
        except ValueError as error:  # object arrays need pickle, which is refused
            raise UserError(f"{path}: cannot read x and y ({error})") from None


def split_validation(data: Data, fraction: float) -> tuple[Data, Data | None]:
    """A seeded random split into (training, validation); no validation part for fraction 0."""
    if fraction == 0:
        return data, None
    count = round(len(data) * fraction)
    if not 0 < count < len(data):
        raise UserError(f"--val-split {fraction} of {len(data)} samples leaves an empty part")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(data))
    return data.subset(order[count:]), data.subset(order[:count])


# ----------------------------------------------------------------------------------------------- model


def find_logits(model: graph.LoadedModel, node_spec: str | None) -> graph.NodeInfo:
    """--node, or the model's single output, or the input of a Softmax that produces it."""
    if node_spec:
        node = graph.resolve_node(model, node_spec)
    elif len(model.outputs) != 1:
        names = ", ".join(output.name for output in model.outputs)
        raise UserError(f"the model has several outputs ({names}): choose the logits with --node")
    else:
        node = graph.logits_node(model)
    if node.op_type in graph.SOFTMAX_OPS:
        raise UserError(f"{node.output} is the output of a {node.op_type}; train on the logits before it (--node)")
    if len(node.shape) != 2 or not isinstance(node.shape[1], int):
        raise UserError(f"tensor '{node.output}' has shape {node.shape}; training needs logits [N, classes] "
                        "(choose them with --node)")
    return node


@dataclass(frozen=True)
class Source:
    """Where a tensor of the torch module came from: module tensor = initializer (transposed) * scale."""

    initializer: str
    scale: float = 1.0
    transpose: bool = False


# Which input of an ONNX node each tensor of onnx2torch's module for that node holds. These are the
# converters that make modules with weights; others keep initializers as constant buffers, never trained.
_TENSOR_INPUTS = {
    "Conv": {"weight": 1, "bias": 2},
    "ConvTranspose": {"weight": 1, "bias": 2},
    "Gemm": {"weight": 1, "bias": 2},
    "BatchNormalization": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
    "InstanceNormalization": {"weight": 1, "bias": 2},
    "LayerNormalization": {"weight": 1, "bias": 2},
    "DualSlopePRelu": {"forward_slope": 1},
}


@dataclass
class Network:
    """The proxy module computing the logits, its weights as read from the file, and their ONNX sources."""

    module: nn.Module
    file_state: dict
    sources: dict[str, Source]  # state_dict key -> initializer
    rewritten: dict


def build_network(model: graph.LoadedModel, logits: graph.NodeInfo, backward_slope: float) -> Network:
    cut = graph.cut_at(model.repaired, model.input.name, logits.output)
    proxy_model, rewritten = proxy.build_proxy(cut, backward_slope)
    module = graph.to_torch(proxy_model)
    sources = tensor_sources(proxy_model, module)
    if not list(module.parameters()):
        raise UserError("the model has no trainable weights (only Conv, Gemm, normalization and PRelu weights "
                        "are trained; MatMul/Add constants are not)")
    return Network(module, snapshot(module), sources, dict(rewritten))


def tensor_sources(onnx_model: onnx.ModelProto, module: nn.Module) -> dict[str, Source]:
    # onnx2torch calls one submodule per ONNX node, in graph order.
    targets = [node.target for node in module.graph.nodes if node.op == "call_module"]
    sources: dict[str, Source] = {}
    for node, target in zip(onnx_model.graph.node, targets, strict=True):
        inputs = _TENSOR_INPUTS.get(node.op_type, {})
        for local_key in module.get_submodule(target).state_dict():
            tensor_name = local_key.rsplit(".", 1)[-1]  # padded convolutions are Sequential(pad, conv)
            if tensor_name == "num_batches_tracked":
                continue
            if tensor_name not in inputs:
                raise UserError(f"cannot map tensor '{tensor_name}' of {node.op_type} node '{node.name}' back to ONNX")
            sources[f"{target}.{local_key}"] = _source(node, inputs[tensor_name])
    _refuse_shared(sources)
    return sources


def _source(node: onnx.NodeProto, input_index: int) -> Source:
    initializer = node.input[input_index]
    if node.op_type != "Gemm":
        return Source(initializer)
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    if input_index == 1:  # onnx2torch's Linear weight is alpha * B, transposed unless transB
        return Source(initializer, attributes.get("alpha", 1.0), not attributes.get("transB", 0))
    return Source(initializer, attributes.get("beta", 1.0))


def _refuse_shared(sources: dict[str, Source]):
    users: dict[str, list[str]] = {}
    for key, source in sources.items():
        users.setdefault(source.initializer, []).append(key)
    shared = {name: keys for name, keys in users.items() if len(keys) > 1}
    if shared:
        name, keys = next(iter(shared.items()))
        raise UserError(f"initializer '{name}' is shared by {', '.join(keys)}; "
                        "training shared weights is not supported")


def snapshot(module: nn.Module) -> dict:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def reinitialize(module: nn.Module, seed: int):
    """Fresh weights for the same architecture, drawn as torch's own layers draw them."""
    torch.manual_seed(seed)
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
    for op in proxy.dual_slope_modules(module):
        if isinstance(op.forward_slope, nn.Parameter):
            nn.init.constant_(op.forward_slope, PRELU_INITIAL_SLOPE)


def initial_state(network: Network, seed: int | None) -> dict:
    """The file's weights (seed None) or fresh ones drawn from `seed`."""
    network.module.load_state_dict(network.file_state)
    if seed is not None:
        reinitialize(network.module, seed)
    return snapshot(network.module)


def export_trained(repaired: onnx.ModelProto, state: dict, sources: dict[str, Source]) -> onnx.ModelProto:
    """A copy of the repaired (original-rectifier) model with the trained tensors written into its initializers."""
    trained = onnx.ModelProto()
    trained.CopyFrom(repaired)
    initializers = {tensor.name: tensor for tensor in trained.graph.initializer}
    for key, source in sources.items():
        tensor = initializers[source.initializer]
        value = state[key].detach().cpu().numpy() / source.scale
        value = value.T if source.transpose else value
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensor.CopyFrom(numpy_helper.from_array(value.reshape(tuple(tensor.dims)).astype(dtype), tensor.name))
    return trained


# -------------------------------------------------------------------------------------------- training


@dataclass
class EpochLog:
    method: str
    seed: int
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None


@dataclass
class Run:
    method: str
    seed: int
    epochs: list[EpochLog] = field(default_factory=list)
    best_state: dict | None = None
    best_epoch: int | None = None
    checkpoint: dict | None = None  # set when Ctrl-C stopped the run

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


def train_run(network: Network, start: dict, fit: Data, val: Data | None, settings: TrainSettings, method: str,
              seed: int) -> Run:
    """Train from `start`, keeping the weights of the epoch with the best validation accuracy (the last epoch
    without a validation split). Ctrl-C ends the run early with a checkpoint."""
    module = network.module
    module.load_state_dict(start)
    proxy.set_backward_slope(module, settings.backward_slope if method == "proxygrad" else None)
    torch.manual_seed(seed)  # dropout and the like draw the same numbers for both methods
    order = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(module, settings)
    run = Run(method, seed)
    for epoch in range(1, settings.epochs + 1):
        try:
            train_loss, train_accuracy = train_epoch(module, optimizer, fit, settings.batch_size, order,
                                                     f"{run.name} epoch {epoch}/{settings.epochs}")
            val_loss, val_correct = evaluate(module, val) if val is not None else (None, None)
        except KeyboardInterrupt:
            run.checkpoint = {"method": method, "seed": seed, "epochs_done": epoch - 1,
                              "model": snapshot(module), "optimizer": optimizer.state_dict()}
            return run
        val_accuracy = val_correct / len(val) if val is not None else None
        earlier = [entry.val_accuracy for entry in run.epochs]
        run.epochs.append(EpochLog(method, seed, epoch, train_loss, train_accuracy, val_loss, val_accuracy))
        if val is None or val_accuracy > max(earlier, default=-1.0):
            run.best_state, run.best_epoch = snapshot(module), epoch
    return run


def _optimizer(module: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(module.parameters(), lr=settings.lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(module.parameters(), lr=settings.lr)


def train_epoch(module: nn.Module, optimizer, data: Data, batch_size: int, order: torch.Generator,
                label: str) -> tuple[float, float]:
    """One pass over `data` in an order drawn from `order`; returns the mean loss and accuracy while training."""
    module.train()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    total_loss, correct = 0.0, 0
    batches = torch.randperm(len(data), generator=order).split(batch_size)
    for batch in tqdm(batches, desc=label, unit="batch", leave=False, disable=None):
        logits = module(x[batch])
        loss = F.cross_entropy(logits, y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        correct += int((logits.argmax(1) == y[batch]).sum())
    return total_loss / len(data), correct / len(data)


def evaluate(module: nn.Module, data: Data) -> tuple[float, int]:
    """Mean cross-entropy and the number of correct predictions, in eval mode."""
    module.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), EVAL_BATCH):
            x = torch.from_numpy(data.x[start:start + EVAL_BATCH])
            y = torch.from_numpy(data.y[start:start + EVAL_BATCH])
            logits = module(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(data), correct


def train_all(network: Network, fit: Data, val: Data | None, settings: TrainSettings) -> list[Run]:
    """Every method for seeds 0..K-1; the methods of one seed share initial weights and data order.
    Stops after a run that Ctrl-C interrupted."""
    runs = []
    for seed in range(settings.seeds):
        start = initial_state(network, seed if settings.reinit else None)
        for method in settings.methods:
            runs.append(train_run(network, start, fit, val, settings, method, seed))
            if runs[-1].checkpoint:
                return runs
    return runs


# ------------------------------------------------------------------------------------ export & scoring


def score_run(run: Run, network: Network, model: graph.LoadedModel, logits: graph.NodeInfo,
              evaluation: Data) -> tuple[dict, onnx.ModelProto]:
    """Accuracy of the run's kept weights in torch, and of its exported model in onnxruntime."""
    network.module.load_state_dict(run.best_state)
    _, torch_correct = evaluate(network.module, evaluation)
    exported = export_trained(model.repaired, run.best_state, network.sources)
    runtime_logits = TensorScorer(exported, model.input.name, logits.output)(evaluation.x)
    runtime_correct = int((runtime_logits.argmax(axis=1) == evaluation.y).sum())
    record = {"method": run.method, "seed": run.seed, "best_epoch": run.best_epoch,
              "accuracy": torch_correct / len(evaluation), "onnxruntime_accuracy": runtime_correct / len(evaluation),
              "validated": torch_correct == runtime_correct, "model": f"{run.name}.onnx"}
    return record, exported


def summarize(records: list[dict]) -> dict:
    """Accuracy mean and sample standard deviation over seeds, per method."""
    summary = {}
    for method in dict.fromkeys(record["method"] for record in records):
        accuracies = [record["accuracy"] for record in records if record["method"] == method]
        summary[method] = {"mean": float(np.mean(accuracies)),
                           "std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                           "seeds": len(accuracies)}
    return summary


def summary_lines(document: dict) -> list[str]:
    lines = [f"accuracy on the {document['evaluated_on']} ({document['evaluation_samples']} samples), "
             f"epoch kept by {document['kept_by']}:"]
    for method, stats in document["summary"].items():
        lines.append(f"  {method:9s} {stats['mean']:.4f} ± {stats['std']:.4f} over {stats['seeds']} seed(s)")
    agreeing = sum(record["validated"] for record in document["runs"])
    lines.append(f"onnxruntime on the exported models agrees with torch in {agreeing}/{len(document['runs'])} runs")
    return lines


# ------------------------------------------------------------------------------------------ log & plot

COLORS = {"standard": (31, 119, 180), "proxygrad": (214, 39, 40)}


def write_log(path: Path, runs: list[Run]):
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[name for name in EpochLog.__dataclass_fields__])
        writer.writeheader()
        for run in runs:
            writer.writerows(asdict(entry) for entry in run.epochs)


def curves_image(runs: list[Run]) -> Image.Image:
    """Training loss and validation (else training) accuracy per epoch, one line per run, coloured by method."""
    has_validation = any(entry.val_accuracy is not None for run in runs for entry in run.epochs)
    panels = [("training loss", "train_loss"),
              ("validation accuracy", "val_accuracy") if has_validation else ("training accuracy", "train_accuracy")]
    charts = [line_chart(title, [(run.method, [getattr(entry, key) for entry in run.epochs]) for run in runs])
              for title, key in panels]
    image = Image.new("RGB", (sum(chart.width for chart in charts), charts[0].height), "white")
    for index, chart in enumerate(charts):
        image.paste(chart, (index * chart.width, 0))
    return image


def line_chart(title: str, lines: list[tuple[str, list[float]]], size=(480, 300)) -> Image.Image:
    """A line chart with axes, the y range and epoch count as tick labels, and a legend of methods."""
    width, height = size
    left, right, top, bottom = 56, 16, 28, 28
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    values = [value for _, series in lines for value in series if math.isfinite(value)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0
    epochs = max((len(series) for _, series in lines), default=1)

    def point(index: int, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * index / max(epochs - 1, 1),
                top + (height - top - bottom) * (high - value) / (high - low))

    draw.text((left, 6), title, fill="black", font=font)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    draw.text((4, top - 6), f"{high:.3g}", fill="black", font=font)
    draw.text((4, height - bottom - 6), f"{low:.3g}", fill="black", font=font)
    draw.text((left, height - bottom + 6), "epoch 1", fill="black", font=font)
    draw.text((width - right - 56, height - bottom + 6), f"epoch {epochs}", fill="black", font=font)
    for method, series in lines:
        points = [point(index, value) for index, value in enumerate(series) if math.isfinite(value)]
        if len(points) > 1:
            draw.line(points, fill=COLORS[method], width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=COLORS[method])
    for column, method in enumerate(reversed(dict.fromkeys(method for method, _ in lines))):
        x = width - right - 90 * (column + 1)  # the legend sits in the title row, clear of the lines
        draw.line([(x, 13), (x + 18, 13)], fill=COLORS[method], width=2)
        draw.text((x + 22, 6), method, fill="black", font=font)
    return image


# ---------------------------------------------------------------------------------------------- command


@dataclass
class Outcome:
    document: dict
    folder: Path
    interrupted: bool


def train(request: Request) -> Outcome:
    """Load, train every requested run, export and re-score each in onnxruntime, and write the folder."""
    settings = request.settings
    settings.check()
    _check_onnx_out(request.onnx_out, settings)
    model = graph.load_model(request.model, request.input_shapes, request.input_name)
    logits = find_logits(model, request.node)
    classes = logits.shape[1]
    fit, val = split_validation(load_data(request.data, model.input, classes), settings.val_split)
    test = load_data(request.test_data, model.input, classes) if request.test_data else None
    if test is None and val is None:
        raise UserError("nothing to measure accuracy on: give --test-data or a --val-split above 0")
    out_dir = request.out or Path("runs") / f"{model.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"
    report.check_out_dir(out_dir, request.force)
    network = build_network(model, logits, settings.backward_slope)
    with report.atomic_dir(out_dir) as folder:
        runs = train_all(network, fit, val, settings)
        evaluation = test if test is not None else val
        records = _write_runs(folder, request.onnx_out, model, logits, network, runs, evaluation)
        document = {
            "model": str(request.model), "logits": logits.output, "classes": classes,
            "settings": asdict(settings), "rectifiers_rewritten": network.rewritten,
            "samples": {"train": len(fit), "validation": len(val) if val is not None else 0},
            "evaluated_on": "test data" if test is not None else "validation split",
            "evaluation_samples": len(evaluation),
            "kept_by": "best validation accuracy" if val is not None else "last epoch",
            "runs": records, "summary": summarize(records),
            "validated": all(record["validated"] for record in records),
            "interrupted": runs[-1].checkpoint is not None,
        }
        report.write_json(folder / "results.json", document)
    return Outcome(document, out_dir, document["interrupted"])


def _check_onnx_out(onnx_out: Path | None, settings: TrainSettings):
    if onnx_out is None:
        return
    if len(settings.methods) * settings.seeds > 1:
        raise UserError("-o needs a single trained model (one method, one seed); the --out folder holds every run's")
    if not onnx_out.parent.is_dir():
        raise UserError(f"-o {onnx_out}: folder {onnx_out.parent} does not exist")


def _write_runs(folder: Path, onnx_out: Path | None, model: graph.LoadedModel, logits: graph.NodeInfo,
                network: Network, runs: list[Run], evaluation: Data) -> list[dict]:
    """Each run's exported model (and the checkpoint of an interrupted one), the log and the curves;
    returns the runs' scores."""
    records = []
    for run in runs:
        if run.checkpoint:
            torch.save(run.checkpoint, folder / "checkpoint.pt")
        if run.best_state is None:
            continue
        record, exported = score_run(run, network, model, logits, evaluation)
        onnx.save(exported, folder / record["model"])
        if onnx_out:
            onnx.save(exported, onnx_out)
        records.append(record)
    write_log(folder / "log.csv", runs)
    curves_image(runs).save(folder / "curves.png")
    return records
