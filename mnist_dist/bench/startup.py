"""`mnist-dist bench startup`: what a run costs outside training, against Ray Train's own floor.

(a) Ray Train's floor: a fresh process starts the same local Ray as `train`, runs a
    2-worker `DataParallelTrainer` whose function only reports, and shuts Ray down.
(b) `mnist-dist train --epochs 1` in a fresh process: its wall time minus its training time;
(c) with `--peer-python`, Ray's TensorflowTrainer example with tf_keras `fit`
    (mnist_dist.bench.peers) for one epoch of the same images, model and global batch: the same.

Each is timed from outside, process start to exit, as a user meets it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_dist.bench import header, peers, save, table
from mnist_dist.config import TrainConfig


def _report_at_once(_config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def _floor(workers: int) -> None:
    """(a), in the subprocess: the local Ray and Ray Train settings of `mnist-dist train`."""
    import ray
    from ray.train import RunConfig

    from mnist_dist import compat
    from mnist_dist.launcher import init_ray, scaling_config

    config = TrainConfig(workers=workers, synthetic=True)
    init_ray(config)
    with tempfile.TemporaryDirectory() as storage:
        compat.data_parallel_trainer()(_report_at_once, scaling_config=scaling_config(config),
                            run_config=RunConfig(storage_path=storage, name="floor")).fit()
    ray.shutdown()


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall


def _train_seconds(run: Path) -> float:
    return json.loads((run / "result.json").read_text())["train_seconds"]


def run(workers: int = 2, train_limit: int | None = None, json_path: str | None = None, peer_python: str | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    machine = header(log)
    log(f"{workers} Ray workers on an embedded local Ray; `train --epochs 1` on "
        f"{f'the first {train_limit} training images' if train_limit else 'the whole training set'}")
    count = 3 if peer_python else 2
    log(f"[1/{count}] Ray Train with a training function that only reports ...")
    floor = _timed([sys.executable, "-m", "mnist_dist.bench.startup", str(workers)])
    log(f"[2/{count}] mnist-dist train --epochs 1 ...")
    with tempfile.TemporaryDirectory() as storage:
        command = [sys.executable, "-m", "mnist_dist.cli", "train", "--epochs", "1", "--workers", str(workers),
                   "--storage", storage, "--name", "startup"]
        if train_limit:
            command += ["--train-limit", str(train_limit)]
        wall = _timed(command)
        train_seconds = _train_seconds(Path(storage) / "startup")
    outside = wall - train_seconds
    rows = [["ray train, function that only reports", f"{floor:.1f}", "", f"{floor:.1f}", "1.00x"],
            ["mnist-dist train --epochs 1", f"{wall:.1f}", f"{train_seconds:.1f}", f"{outside:.1f}", f"{outside / floor:.2f}x"]]
    peer = None
    if peer_python:
        log(f"[3/{count}] ray TensorflowTrainer + tf_keras fit, 1 epoch ...")
        # What `train --epochs 1` trains: its model, global batch, images and recipe.
        peer = peers.measure(peer_python, "ray", TrainConfig(workers=workers, train_limit=train_limit), epochs=1)
        rows.append(["ray TensorflowTrainer + tf_keras fit, 1 epoch", f"{peer['wall_seconds']:.1f}", f"{peer['train_seconds']:.1f}",
                     f"{peer['startup_overhead_seconds']:.1f}", f"{peer['startup_overhead_seconds'] / floor:.2f}x"])
    table(["setup", "wall s", "training s", "outside training s", "vs Ray floor"], rows, log)
    if peer:
        log(f"mnist-dist train against the peer: {outside / peer['startup_overhead_seconds']:.2f}x its seconds outside training")
    payload = {"benchmark": "startup", "machine": machine, "workers": workers, "train_limit": train_limit,
               "ray_floor_seconds": floor, "train_wall_seconds": wall, "train_seconds": train_seconds,
               "startup_overhead_seconds": outside, "peer": peer}
    save(json_path, payload, log)
    return payload


if __name__ == "__main__":
    _floor(int(sys.argv[1]))
