"""onnxruntime on the UNCHANGED model: expose the target tensor, re-score inputs, compare with torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime

from onnxproxy.settings import DEFAULT_ATOL, DEFAULT_RTOL


def exposing(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `tensors` (intermediate ones appended), each with
    its inferred type and shape where the model has one: onnx2torch's pooling and BatchNorm converters read
    the rank of their input from it."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {value.name: value for value in list(exposed.graph.value_info) + list(exposed.graph.output)}
    del exposed.graph.output[:]
    for name in tensors:
        exposed.graph.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return exposed


def session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # old exporters' models trigger many harmless warnings
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class TensorScorer:
    """Runs the unchanged model in onnxruntime and returns one intermediate tensor, one input at a time
    (many third-party models fix their batch size at 1)."""

    def __init__(self, original: onnx.ModelProto, input_name: str, tensor: str):
        self.input_name = input_name
        self.session = session(exposing(original, [tensor]))

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        rows = [self.session.run(None, {self.input_name: row[None].astype(np.float32)})[0] for row in inputs]
        return np.concatenate(rows, axis=0)


@dataclass
class Agreement:
    max_abs_diff: float
    validated: list[bool]


def agree(torch_values: np.ndarray, runtime_values: np.ndarray, atol: float = DEFAULT_ATOL,
          rtol: float = DEFAULT_RTOL) -> Agreement:
    """Per value: |torch - onnxruntime| <= atol + rtol * |onnxruntime| (non-finite values never agree)."""
    torch_values, runtime_values = np.asarray(torch_values, float), np.asarray(runtime_values, float)
    difference = np.abs(torch_values - runtime_values)
    ok = np.isfinite(difference) & (difference <= atol + rtol * np.abs(runtime_values))
    finite = difference[np.isfinite(difference)]
    return Agreement(float(finite.max()) if finite.size else float("nan"), [bool(value) for value in ok])
