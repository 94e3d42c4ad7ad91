"""Checkpoints: a directory with `model.keras` (weights + optimizer slots) and `state.json`.

`state.json` is written last, by rename, and records the SHA-256 of `model.keras`. A
directory without it, or whose model does not match the digest, is not a checkpoint:
a crash mid-write can never leave something that looks valid.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mnist_dist.errors import MnistDistError

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"


class CheckpointError(MnistDistError):
    """A checkpoint that cannot be used; the message says which and why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(directory: Path, model, state: dict[str, Any]) -> Path:
    """Write model (compiled with its optimizer, so the slots are saved) and state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    write_json_atomic(directory / STATE_FILE, {**state, "model_sha256": file_sha256(directory / MODEL_FILE)})
    return directory


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist. Fix: pass a checkpoint_* folder of a run, or --run RUN_DIR.")
    state_path, model_path = directory / STATE_FILE, directory / MODEL_FILE
    if not state_path.is_file() or not model_path.is_file():
        raise CheckpointError(
            f"{directory}: incomplete checkpoint (needs {MODEL_FILE} and {STATE_FILE}); it was probably cut off mid-write. "
            "Fix: use another checkpoint of the run."
        )
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path}: not valid JSON ({exc}). Fix: use another checkpoint of the run.") from None
    if file_sha256(model_path) != state.get("model_sha256"):
        raise CheckpointError(
            f"{model_path}: content does not match the SHA-256 recorded in {STATE_FILE}: the checkpoint is corrupt. "
            "Fix: use another checkpoint of the run."
        )
    return state


def restore_into(model, directory: str | os.PathLike) -> dict[str, Any]:
    """Load weights and optimizer slots into an already built (and compiled) model."""
    state = load_state(directory)
    model.load_weights(Path(directory) / MODEL_FILE)
    return state


def load_model_at(location):
    """`load_model` of a checkpoint wherever the run store has it (mnist_dist.store.Location)."""
    try:
        with location.local_copy() as local:
            return load_model(local)
    except FileNotFoundError:
        raise CheckpointError(f"{location}: checkpoint directory does not exist. Fix: pass a checkpoint_* folder of a run, "
                              "or --run RUN_DIR.") from None


def load_model(directory: str | os.PathLike):
    """The trained Keras model of a checkpoint, for evaluation and export."""
    from mnist_dist.process_setup import import_tensorflow

    import_tensorflow()
    import keras

    state = load_state(directory)
    try:
        model = keras.models.load_model(Path(directory) / MODEL_FILE, compile=False)
    except Exception as exc:
        raise CheckpointError(f"{directory}/{MODEL_FILE}: Keras cannot load it ({type(exc).__name__}: {exc}).") from None
    return model, state
