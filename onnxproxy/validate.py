"""onnxruntime on the UNCHANGED model: expose the target tensor, re-score inputs, compare with torch."""

from __future__ import annotations

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


def close(actual, reference, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Elementwise |actual - reference| <= atol + rtol * |reference| (Polygraphy's criterion); identical values,
    the same infinity or both NaN, count as close."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    identical = (actual == reference) | (np.isnan(actual) & np.isnan(reference))
    with np.errstate(invalid="ignore"):
        return identical | (np.abs(actual - reference) <= atol + rtol * np.abs(reference))


def agree(torch_values, runtime_values, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> list[bool]:
    """Per activation: torch and onnxruntime are close, and finite (a NaN or infinite value is never validated)."""
    finite = np.isfinite(np.asarray(torch_values, np.float64)) & np.isfinite(np.asarray(runtime_values, np.float64))
    return [bool(value) for value in close(torch_values, runtime_values, atol, rtol) & finite]
