"""Train a run: on Ray Train workers (the default), or in this process (`--in-process`)."""
from __future__ import annotations

from typing import Any

from mnist_dist.config import TrainConfig


def run(config: TrainConfig, in_process: bool = False) -> dict[str, Any]:
    """Trains to `config.epochs` and returns the content of result.json. Both ways check the
    data and settle its path before any worker starts (data.settle_dir)."""
    if in_process:
        from mnist_dist.local import train_in_process
        return train_in_process(config)
    from mnist_dist.launcher import stop_ray, train
    try:
        return train(config)
    finally:
        stop_ray()
