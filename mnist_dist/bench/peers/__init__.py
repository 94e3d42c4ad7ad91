"""The peers of `mnist-dist bench`: what a user would run instead of mnist-dist, in a venv of
their own (the `bench-peer` lock), since tf-keras needs the `tensorflow` distribution that
must not sit beside the project's tensorflow-cpu and Keras 3.

`legacy_keras_peer.py` is run as a script by that venv's Python; it imports nothing of
mnist_dist. This module hands it the project's images and settings, runs it, and reads its
one JSON line.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.errors import MnistDistError

SCRIPT = Path(__file__).with_name("legacy_keras_peer.py")
# The models the peer script builds in tf_keras, layer for layer as mnist_dist.models.
MODELS = ("tf-tutorial", "lenet5")
MODES = {"ray": "ray TensorflowTrainer + tf_keras fit", "tf-config": "TF_CONFIG + tf_keras fit, no ray"}
HOW_TO_MAKE = ("python3.11 -m venv PEER && PEER/bin/pip install --require-hashes -r "
               "scripts/lock/bench-peer-$(uname -m).txt (docs/benchmarks.md#the-peers)")
# A peer that has not finished in this long is stuck (a worker waiting on one that died).
DEADLINE_S = 3600


class PeerFailed(MnistDistError):
    """A peer run that failed or printed no result; the message holds its own output's tail."""


def check(python: str | None, config: TrainConfig) -> None:
    """Before any measuring: the peer venv answers, with tf_keras, Ray and tf2onnx, and can train `config`."""
    if python is None:
        return
    if config.model not in MODELS:
        raise ConfigError(f"--peer-python: the peers build {' and '.join(MODELS)} in tf_keras, not {config.model}. "
                          f"Fix: --model {MODELS[0]}, or leave out --peer-python")
    if config.augment or config.synthetic:
        raise ConfigError(f"--peer-python: the peers train on MNIST as it is, without "
                          f"{'--augment' if config.augment else '--synthetic'}. Fix: leave it out, or leave out --peer-python")
    try:
        proc = subprocess.run([python, "-P", "-c", "import importlib.util as u; "
                               "print(', '.join(m for m in ('tensorflow', 'tf_keras', 'ray', 'tf2onnx') if not u.find_spec(m)))"],
                              capture_output=True, text=True, timeout=120)
    except OSError as error:
        raise ConfigError(f"--peer-python {python}: {error.strerror}. Fix: make the venv: {HOW_TO_MAKE}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"--peer-python {python} did not answer in 120 s. Fix: {HOW_TO_MAKE}") from None
    missing = proc.stdout.strip()
    if proc.returncode or missing:
        raise ConfigError(f"--peer-python {python} lacks {missing or 'a working Python 3.11'}. Fix: {HOW_TO_MAKE}")


def measure(python: str, mode: str, config: TrainConfig, *, epochs: int, steps: int | None = None,
            probe_every: int = 0, convert: bool = False) -> dict[str, Any]:
    """One peer run of `config`'s model, precision, workers, global batch and recipe (optimizer,
    rate and its decay per epoch, L2), on the images the project's run of `config` trains on,
    timed from outside as a user meets it. `steps` per epoch defaults to every whole global
    batch, as the project's; `probe_every` N steps, the test accuracy (not counted as training);
    `convert`: then the model to ONNX with tf2onnx, run over the test set."""
    from mnist_dist import data as mnist
    from mnist_dist.machine import usable_cores

    images = mnist.load(config.data_dir, val_size=config.val_size, train_limit=config.train_limit)
    global_batch = config.global_batch_size
    arguments = {"model": config.model, "global_batch": global_batch, "precision": config.precision,
                 "workers": config.workers, "epochs": epochs, "steps": steps or len(images.train_y) // global_batch,
                 "optimizer": config.optimizer, "learning_rate": config.learning_rate, "lr_decay": config.lr_decay,
                 "momentum": config.momentum, "l2": config.l2, "probe_every": probe_every, "convert": convert,
                 "pixel_offset": mnist.PIXEL_OFFSET, "pixel_scale": mnist.PIXEL_SCALE,
                 "cpus_per_worker": max(1, usable_cores() // config.workers)}
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)  # nothing of the project's environment
    with tempfile.TemporaryDirectory(prefix="mnist-peer-") as storage:
        # uint8, as the project keeps them; the peer normalizes with the constants it is handed.
        arguments["data"] = os.path.join(storage, "mnist.npz")
        np.savez(arguments["data"], x=images.train_x, y=images.train_y, test_x=images.test_x, test_y=images.test_y)
        started = time.perf_counter()
        workers = [None] if mode == "ray" else _tf_config_workers(config.workers, arguments["cpus_per_worker"])
        out = _run_workers(python, mode, json.dumps(arguments), storage, env, workers)
        wall = time.perf_counter() - started
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise PeerFailed(f"the peer ({MODES[mode]}) printed no result; its output ended: {out[-500:]!r}") from None
    return {**result, "wall_seconds": wall, "startup_overhead_seconds": wall - result["train_seconds"]}


def _tf_config_workers(workers: int, cpus_per_worker: int) -> list[dict[str, str]]:
    """Each worker's environment: TF_CONFIG naming the cluster and its index, and its own
    block of cores, as the project's Ray workers get (mnist_dist.process_setup.cores_to_pin)."""
    ports = []
    with contextlib.ExitStack() as stack:
        for _ in range(workers):
            probe = stack.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    hosts = [f"127.0.0.1:{port}" for port in ports]
    cores = sorted(os.sched_getaffinity(0))
    return [{"TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": rank}}),
             "PEER_CORES": ",".join(map(str, cores[rank * cpus_per_worker:(rank + 1) * cpus_per_worker]))}
            for rank in range(workers)]


def _run_workers(python: str, mode: str, arguments: str, storage: str, env: dict[str, str],
                 worker_envs: list[dict[str, str] | None], script: Path = SCRIPT, deadline_s: float = DEADLINE_S) -> str:
    """Starts one process per entry of `worker_envs` and returns the first one's stdout. The
    first to fail stops the others (they would wait on it for good), and is named."""
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        try:
            for rank, extra in enumerate(worker_envs):
                out = stack.enter_context(open(Path(storage) / f"worker-{rank}.out", "w+"))
                err = stack.enter_context(open(Path(storage) / f"worker-{rank}.err", "w+"))
                procs.append(subprocess.Popen([python, "-P", str(script), mode, arguments, storage], stdout=out,
                                              stderr=err, text=True, cwd=storage, env={**env, **(extra or {})}))
            ends = time.monotonic() + deadline_s
            failed = None
            while failed is None and any(p.poll() is None for p in procs):
                failed = next((rank for rank, p in enumerate(procs) if p.poll()), None)
                if time.monotonic() > ends:
                    raise PeerFailed(f"the peer ({MODES[mode]}) did not finish in {deadline_s:.0f} s; stopped it")
                time.sleep(0.05)
            failed = next((rank for rank, p in enumerate(procs) if p.returncode), failed)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        if failed is not None:
            tail = (Path(storage) / f"worker-{failed}.err").read_text()[-3000:]
            raise PeerFailed(f"the peer ({MODES[mode]}) failed: worker {failed} exited with {procs[failed].returncode}:\n{tail}")
        return (Path(storage) / "worker-0.out").read_text()
