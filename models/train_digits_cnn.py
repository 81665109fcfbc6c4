"""Train the embedded default classifier: a small CNN on scikit-learn's digits, exported to ONNX.

    python models/train_digits_cnn.py                  # retrain the model
    python models/train_digits_cnn.py --data-only DIR  # only write the data, for `onnxproxy train`

Writes models/digits_cnn.onnx and models/digits_heldout.npz (the held-out 20 %, preprocessed); with
--data-only, DIR/digits_train.npz and DIR/digits_test.npz instead. See models/README.md.
"""

import argparse
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 30
BATCH = 64
MAX_SHIFT = 2  # pixels of the 32x32 image, i.e. half a pixel of the original 8x8

# (op type, name) of every node in the exported graph, in order; each node's output tensor gets its name.
LAYERS = [
    ("Conv", "conv1"), ("Relu", "relu1"), ("MaxPool", "pool1"),
    ("Conv", "conv2"), ("Relu", "relu2"), ("MaxPool", "pool2"),
    ("Conv", "conv3"), ("Relu", "relu3"), ("MaxPool", "pool3"),
    ("Flatten", "flatten"), ("Gemm", "fc"), ("Relu", "relu_fc"), ("Gemm", "logits"),
]


def preprocess(images):
    """8x8 digits with values 0..16 -> float32 [N, 1, 32, 32] in [-1, 1], as the model expects."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32).reshape(-1, 1, 8, 8))
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return (x / 8.0 - 1.0).numpy()


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv3, self.relu3, self.pool3 = nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc, self.relu_fc, self.logits = nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.pool3(self.relu3(self.conv3(x)))
        return self.logits(self.relu_fc(self.fc(self.flatten(x))))


def random_shift(x, generator):
    """Shift each image by up to MAX_SHIFT pixels, filling with the background value -1."""
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + 32, dx:dx + 32] for i, (dy, dx) in enumerate(offsets)])


def train(x_train, y_train):
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x), generator=generator).split(BATCH):
            loss = F.cross_entropy(model(random_shift(x[batch], generator)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def name_nodes(model):
    """Name each node, and its output tensor, after its layer; the graph output keeps the name `logits`."""
    graph = model.graph
    found = [node.op_type for node in graph.node]
    if found != [op for op, _ in LAYERS]:
        raise RuntimeError(f"unexpected exported graph: {found}")
    renamed = {}
    for node, (_, name) in zip(graph.node, LAYERS):
        node.name = name
        renamed[node.output[0]] = name
        node.output[0] = name
    for node in graph.node:
        node.input[:] = [renamed.get(t, t) for t in node.input]
    for value in list(graph.output) + list(graph.value_info):
        value.name = renamed.get(value.name, value.name)


def export(model, x_check, accuracy):
    # The classic exporter is chosen on purpose: it writes the plain opset-13 graph onnx2torch reads.
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
    buffer = io.BytesIO()
    torch.onnx.export(
        model, torch.zeros(1, 1, 32, 32), buffer, dynamo=False, opset_version=13,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )
    onnx_model = onnx.load_from_string(buffer.getvalue())
    name_nodes(onnx_model)
    onnx_model.producer_name = "onnxproxy models/train_digits_cnn.py"
    onnx_model.producer_version = f"torch {torch.__version__}"
    onnx_model.doc_string = (
        "Small CNN for scikit-learn's 8x8 digits (10 classes). Input `image`: float32 [N, 1, 32, 32], "
        "the 8x8 image upsampled bilinearly and scaled from 0..16 to [-1, 1]. Output `logits`: [N, 10]. "
        f"Held-out accuracy {accuracy:.4f}. See models/README.md."
    )
    onnx_model = onnx.shape_inference.infer_shapes(onnx_model)
    onnx.checker.check_model(onnx_model, full_check=True)

    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(["logits"], {"image": x_check})
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_check)).numpy()
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=0, atol=1e-5)
    path = HERE / "digits_cnn.onnx"
    onnx.save(onnx_model, path)
    return path


def save_split(path, x, y):
    np.savez_compressed(path, x=x.astype(np.float32), y=y.astype(np.int64))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-only", type=Path, metavar="DIR",
                        help="write DIR/digits_train.npz and DIR/digits_test.npz, without training")
    args = parser.parse_args()

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        preprocess(digits.images), digits.target.astype(np.int64),
        test_size=0.2, stratify=digits.target, random_state=SEED,
    )
    if args.data_only:
        args.data_only.mkdir(parents=True, exist_ok=True)
        save_split(args.data_only / "digits_train.npz", x_train, y_train)
        save_split(args.data_only / "digits_test.npz", x_test, y_test)
        print(f"wrote digits_train.npz and digits_test.npz to {args.data_only}")
        return
    start = time.perf_counter()
    model = train(x_train, y_train)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"trained in {seconds:.1f} s; held-out accuracy {accuracy:.4f} ({len(y_test)} images)")

    path = export(model, x_test, accuracy)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({path.stat().st_size} bytes, {n_params} parameters)")
    heldout = HERE / "digits_heldout.npz"
    save_split(heldout, x_test, y_test)
    print(f"wrote {heldout} ({heldout.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
