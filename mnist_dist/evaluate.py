"""Evaluate a checkpoint on the test set (or another split)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mnist_dist.config import TrainConfig


def predict_logits(model, images_uint8: np.ndarray, batch: int = 1000, log=None) -> np.ndarray:
    """Logits of uint8 images; with `log`, progress lines as it goes."""
    from mnist_dist.data import normalize

    batches = (images_uint8[i: i + batch] for i in range(0, len(images_uint8), batch))
    if log is not None:
        from mnist_dist.progress import track
        batches = track(batches, len(images_uint8), "  TensorFlow", " images", log=log)
    return np.concatenate([np.asarray(model(normalize(x), training=False), dtype=np.float32) for x in batches])


def accuracy_and_loss(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {"accuracy": float((logits.argmax(1) == labels).mean()),
            "loss": float(-log_probs[np.arange(len(labels)), labels].mean())}


def evaluate_checkpoint(directory: str | Path, config: TrainConfig | None = None,
                        split: str = "test") -> tuple[dict[str, Any], dict[str, float]]:
    """(checkpoint state, {"accuracy", "loss"}) on a split of the data the run was trained on."""
    from mnist_dist.checkpoint import load_model
    from mnist_dist.data import load_for

    model, state = load_model(directory)
    config = config or TrainConfig.from_saved(state["config"])
    data = load_for(config)
    images, labels = {"test": (data.test_x, data.test_y), "val": (data.val_x, data.val_y)}[split]
    return state, accuracy_and_loss(predict_logits(model, images), labels)
