"""Run an exported model with ONNX Runtime. Reads the normalisation from the model's
metadata, so the runtime never carries a copy of the training constants."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mnist_edge.errors import EdgeError

# Metadata keys written by `mnist-dist export` (see docs/design.md: the export/report.json schema).
META_NORMALIZATION = "mnist_dist.normalization"
META_LABELS = "mnist_dist.labels"
# ONNX Runtime session settings the model needs to run at its best, as JSON, e.g.
# {"disabled_optimizers": ["QDQPropagationTransformer"]} on the int8 model, and session
# config entries ("config") on the int4 one (see export).
META_SESSION = "mnist_dist.ort_session"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# 4-bit weights (`export --int4`): no .ort twin, since ORT's format cannot hold int4 tensors.
INT4_FILE = "model.int4.onnx"
# The same models in the ONNX Runtime format, which ORT's minimal and mobile builds load.
ORT_FILES = {FP32_FILE: "model.ort", INT8_FILE: "model.int8.ort"}
# The operators of the .ort models: what a reduced ORT build takes (--include_ops_by_config).
REQUIRED_OPERATORS = "required_operators.config"


def resolve_model(path: str | Path, int8: bool = False, ort_format: bool = False, int4: bool = False) -> Path:
    """A .onnx or .ort file, or an export directory (its model.onnx, model.int8.onnx with
    int8, model.int4.onnx with int4, or the .ort twins of the first two with ort_format)."""
    path = Path(path)
    if int8 and int4:
        raise EdgeError("--int8 and --int4 name two models. Fix: pass one of them.")
    if int4 and ort_format:
        raise EdgeError("the int4 model has no .ort twin: ONNX Runtime's format cannot hold 4-bit tensors. "
                        "Fix: drop --ort to run model.int4.onnx, or pass --int8 --ort.")
    if path.is_dir():
        name = INT4_FILE if int4 else INT8_FILE if int8 else FP32_FILE
        path = path / (ORT_FILES[name] if ort_format else name)
    if not path.is_file():
        if int4 and path.parent.is_dir() and path.name == INT4_FILE:
            raise EdgeError(f"{path}: this export has no int4 model. Fix: export it with `mnist-dist export --int4`, "
                            "or drop --int4.")
        raise EdgeError(f"{path}: model file not found. Fix: pass an export directory made by `mnist-dist export`, "
                        "or a .onnx or .ort file.")
    return path


def session_settings(path: str | Path) -> dict:
    """The model's own ONNX Runtime settings (META_SESSION), read without optimizing it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    meta = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    return json.loads(meta.get(META_SESSION, "{}"))


def open_session(path: str | Path, threads: int = 1, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads and the model's own settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    settings = session_settings(path)
    for key, value in settings.get("config", {}).items():
        options.add_session_config_entry(key, value)
    disabled = settings.get("disabled_optimizers", [])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


class Classifier:
    def __init__(self, model: str | Path, int8: bool = False, threads: int = 1, ort_format: bool = False,
                 int4: bool = False):
        self.path = resolve_model(model, int8, ort_format, int4)
        try:
            self.session = open_session(self.path, threads)
        except Exception as exc:  # onnxruntime raises its own opaque types for bad files
            raise EdgeError(f"{self.path}: ONNX Runtime cannot load this model ({str(exc).splitlines()[0]}). "
                            "Fix: re-export it with `mnist-dist export`.") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in (META_NORMALIZATION, META_LABELS) if key not in meta]
        if missing:
            raise EdgeError(f"{self.path}: model lacks the metadata {missing} that says how to scale pixels. "
                            "Fix: use a model written by `mnist-dist export`, which records it.")
        norm = json.loads(meta[META_NORMALIZATION])
        self.offset, self.scale = float(norm["offset"]), float(norm["scale"])
        self.labels = json.loads(meta[META_LABELS])
        self.metadata = dict(meta)
        (self.input,) = self.session.get_inputs()
        self.input_name = self.input.name

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) white-on-black -> the model's float32 (N, 28, 28, 1) input."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            raise EdgeError(f"pixels must be uint8 0-255, got {pixels.dtype}. Fix: convert with np.clip(a, 0, 255).astype(np.uint8).")
        if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
            raise EdgeError(f"pixels must have shape (N, 28, 28), got {pixels.shape}.")
        return ((pixels.astype(np.float32) - self.offset) / self.scale)[..., None]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            raise EdgeError("no images to classify. Fix: pass at least one input.")
        return self.session.run(None, {self.input_name: self.normalize(pixels)})[0]

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N,), probabilities (N, 10)) for uint8 images (N, 28, 28)."""
        logits = self.logits(pixels).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = exp / exp.sum(axis=1, keepdims=True)
        return probs.argmax(axis=1), probs
