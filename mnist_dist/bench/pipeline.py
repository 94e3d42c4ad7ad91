"""`mnist-dist bench pipeline`: wall seconds from a command's start to an ONNX model checked
against the test set.

(a) `mnist-dist pipeline` in a fresh process: start-up, training, the export (fp32 and int8,
    `.onnx` and `.ort`) and its verification on the whole test set;
(b) with `--peer-python`, the peer's train-then-convert script (mnist_dist.bench.peers): Ray's
    TensorflowTrainer example with tf_keras (with `--in-process`, the TF_CONFIG recipe
    without Ray), then tf2onnx and ONNX Runtime over the test set.

Both train the same configuration; each is timed from outside, as a user meets it.
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

from mnist_dist.bench import header, save, table
from mnist_dist.config import TrainConfig
from mnist_dist.errors import MnistDistError


def _project(config: TrainConfig, in_process: bool) -> dict[str, Any]:
    """(a): the library's pipeline in a process of its own, from its start to its exit."""
    with tempfile.TemporaryDirectory(prefix="mnist-bench-pipeline-") as storage:
        config = config.replace(storage=storage, name="bench-pipeline")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mnist_dist.bench.pipeline", json.dumps(config.to_dict()),
                               *(["in-process"] if in_process else [])], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            raise MnistDistError(f"mnist-dist pipeline failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        result = json.loads((Path(storage) / "bench-pipeline" / "result.json").read_text())
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": wall, "train_seconds": result["train_seconds"]}


def run(config: TrainConfig, json_path: str | None = None, peer_python: str | None = None, in_process: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from mnist_dist.bench import peers

    machine = header(log)
    where = "in one process" if in_process else f"{config.workers} Ray worker(s)"
    log(f"{config.model}, {where} x batch {config.batch_size}, {config.epochs} epochs, "
        f"precision {config.precision}")
    log(f"[1/{2 if peer_python else 1}] mnist-dist pipeline ...")
    project = _project(config, in_process)
    rows = [["mnist-dist pipeline", f"{project['wall_seconds']:.1f}", f"{project['train_seconds']:.1f}",
             f"{project['wall_seconds'] - project['train_seconds']:.1f}", f"{100 * project['onnx_accuracy']:.2f}%",
             "verified" if project["verified"] else "rejected"]]
    peer = None
    if peer_python:
        # In one process against the peer without Ray (TF_CONFIG), as `--in-process` trains without it.
        mode = "tf-config" if in_process else "ray"
        name = f"{peers.MODES[mode]}, then tf2onnx"
        log(f"[2/2] {name} ...")
        peer = peers.measure(peer_python, mode, config, epochs=config.epochs, convert=True)
        rows.append([name, f"{peer['wall_seconds']:.1f}", f"{peer['train_seconds']:.1f}",
                     f"{peer['wall_seconds'] - peer['train_seconds']:.1f}", f"{100 * peer['onnx_accuracy']:.2f}%",
                     f"{peer['disagreements']} of the test set disagree with tf_keras"])
    table(["setup", "wall s", "training s", "the rest s", "ONNX test accuracy", "check"], rows, log)
    if peer:
        log(f"mnist-dist pipeline against the peer: {project['wall_seconds'] / peer['wall_seconds']:.2f}x its wall seconds")
    payload = {"benchmark": "pipeline", "machine": machine, "config": config.to_dict(), "in_process": in_process,
               "project": project, "peer": peer}
    save(json_path, payload, log)
    return payload


if __name__ == "__main__":
    # (a) in a fresh process: `python -m mnist_dist.bench.pipeline CONFIG_JSON [in-process]`.
    from mnist_dist import pipeline

    report = pipeline.run(TrainConfig.from_dict(json.loads(sys.argv[1])), in_process=sys.argv[2:] == ["in-process"],
                          log=lambda _line: None)
    print(json.dumps({"verified": report["verified"], "onnx_accuracy": report["fp32"]["ort_accuracy"],
                      "int8_accuracy": report["int8"]["ort_accuracy"]}))
