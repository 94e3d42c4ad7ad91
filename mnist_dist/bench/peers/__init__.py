"""The peers of `mnist-dist bench`: what a user would run instead of mnist-dist, in a venv of
their own (the `bench-peer` lock), since tf-keras needs the `tensorflow` distribution that
must not sit beside the project's tensorflow-cpu and Keras 3.

`legacy_keras_peer.py` is run as a script by that venv's Python; it imports nothing of
mnist_dist. This module runs it and reads its one JSON line.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mnist_dist.config import ConfigError

SCRIPT = Path(__file__).with_name("legacy_keras_peer.py")
# The models the peer script builds in tf_keras, layer for layer as mnist_dist.models.
MODELS = ("tf-tutorial", "lenet5")
HOW_TO_MAKE = ("python3.11 -m venv PEER && PEER/bin/pip install --require-hashes -r "
               "scripts/lock/bench-peer-$(uname -m).txt (docs/benchmarks.md#the-peers)")


def check_python(python: str | None) -> None:
    """Before any measuring: the peer venv answers, with tf_keras and Ray in it."""
    if python is None:
        return
    try:
        proc = subprocess.run([python, "-P", "-c", "import importlib.util as u; "
                               "print(', '.join(m for m in ('tensorflow', 'tf_keras', 'ray') if not u.find_spec(m)))"],
                              capture_output=True, text=True, timeout=120)
    except OSError as error:
        raise ConfigError(f"--peer-python {python}: {error.strerror}. Fix: make the venv: {HOW_TO_MAKE}") from None
    missing = proc.stdout.strip()
    if proc.returncode or missing:
        raise ConfigError(f"--peer-python {python} lacks {missing or 'a working Python 3.11'}. Fix: {HOW_TO_MAKE}")


def write_data(train_x: np.ndarray, train_y: np.ndarray, folder: str) -> str:
    """The training images the project's setups use, as uint8 (the peer normalizes them the
    same way, with the constants it is handed)."""
    path = os.path.join(folder, "train.npz")
    np.savez(path, x=train_x, y=train_y)
    return path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _last_json(proc: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    if proc.returncode:
        raise RuntimeError(f"the peer ({what}) failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tf_config_cluster(python: str, arguments: str, storage: str, env: dict[str, str], workers: int) -> dict[str, Any]:
    """TensorFlow's recipe without Ray: one process per worker, each told the cluster by
    TF_CONFIG and pinned to a core of its own (what Ray's `resources_per_worker` asks for)."""
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
    cores = sorted(os.sched_getaffinity(0))
    procs, logs = [], []
    for rank in range(workers):
        tf_config = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": rank}})
        logs.append((open(Path(storage) / f"worker-{rank}.out", "w+"), open(Path(storage) / f"worker-{rank}.err", "w+")))
        procs.append(subprocess.Popen([python, "-P", str(SCRIPT), "tf-config", arguments, storage],
                                      stdout=logs[-1][0], stderr=logs[-1][1], text=True, cwd=storage,
                                      env={**env, "TF_CONFIG": tf_config},
                                      preexec_fn=lambda core=cores[rank % len(cores)]: os.sched_setaffinity(0, {core})))
    # A worker that failed leaves the others waiting on it for good: stop them all then.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
        time.sleep(0.2)
    for p in procs:
        p.kill()
        p.wait()
    out, err = [], []
    for stdout, stderr in logs:
        stdout.seek(0), stderr.seek(0)
        out.append(stdout.read()), err.append(stderr.read())
        stdout.close(), stderr.close()
    failed = next((p.returncode for p in procs if p.returncode), 0)
    return _last_json(subprocess.CompletedProcess(procs[0].args, failed, out[0], "".join(err)), "TF_CONFIG")


def run(python: str, mode: str, *, model: str, global_batch: int, precision: str, steps: int, workers: int,
        learning_rate: float, l2: float, data_path: str, pixel_offset: float, pixel_scale: float,
        cpus_per_worker: int) -> dict[str, Any]:
    """One peer run, timed from outside as a user meets it: `ray` (Ray's TensorflowTrainer
    example) or `tf-config` (TensorFlow's multi-worker recipe: one process per worker)."""
    arguments = json.dumps({"model": model, "global_batch": global_batch, "precision": precision, "steps": steps,
                            "workers": workers, "learning_rate": learning_rate, "l2": l2, "data": data_path,
                            "pixel_offset": pixel_offset, "pixel_scale": pixel_scale, "cpus_per_worker": cpus_per_worker})
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)  # nothing of the project's environment
    with tempfile.TemporaryDirectory(prefix="mnist-peer-") as storage:
        started = time.perf_counter()
        if mode == "ray":
            proc = subprocess.run([python, "-P", str(SCRIPT), "ray", arguments, storage], capture_output=True,
                                  text=True, env=env, cwd=storage)
            result = _last_json(proc, "Ray TensorflowTrainer")
        else:
            result = _tf_config_cluster(python, arguments, storage, env, workers)
        wall = time.perf_counter() - started
    return {**result, "wall_seconds": wall, "startup_overhead_seconds": wall - result["train_seconds"]}
