"""`mnist-dist bench infer`: TensorFlow (the trained Keras model) against ONNX Runtime fp32
and int8 from a verified export, in one run.

Batch-1 latency (median and p99, 1 thread) and batch-256 throughput with 1 thread and with
every core. TensorFlow's thread pools are fixed once it starts, so each TensorFlow thread
count is measured in its own fresh process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mnist_dist.bench import header, save, table
from mnist_dist.machine import usable_cores


def _tensorflow(checkpoint: str, threads: int, iterations: int) -> dict[str, Any]:
    """In a fresh process: the Keras model behind a tf.function, `threads` intra-op threads."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from mnist_dist.checkpoint import load_model
    from mnist_dist.timing import latency_us, throughput

    model, _ = load_model(checkpoint)
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    one, batch = _inputs()
    result = {"b256": throughput(lambda: infer(batch).numpy(), 256, seconds=2.0)}
    if threads == 1:
        result["latency"] = latency_us(lambda: infer(one).numpy(), iterations)
    return result


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    # Real digits, not zeros: the int8 kernels' speed must not flatter constant input.
    from mnist_dist.data import load, normalize

    images = normalize(load(val_size=1000, train_limit=256).train_x[:256])
    return images[:1], images


def _onnxruntime(path: Path, threads: int, iterations: int) -> dict[str, Any]:
    from mnist_dist.timing import latency_us, ort_session, throughput

    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    one, batch = _inputs()
    result = {"b256": throughput(lambda: session.run(None, {name: batch}), 256, seconds=2.0)}
    if threads == 1:
        result["latency"] = latency_us(lambda: session.run(None, {name: one}), iterations)
    return result


def _tf_in_subprocess(checkpoint: str, threads: int, iterations: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "mnist_dist.bench.infer", checkpoint, str(threads), str(iterations)],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode:
        raise RuntimeError(f"TensorFlow measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resolve_export(export: str | None, run: str | None) -> Path:
    from mnist_dist.export import ExportError

    directory = Path(export) if export else Path(run) / "export"
    if not (directory / "report.json").is_file():
        raise ExportError(f"{directory}: no report.json, so no verified export is there. "
                          f"Fix: run `mnist-dist export --run RUN` first, or pass --export DIR.")
    report = json.loads((directory / "report.json").read_text())
    if not report.get("verified"):
        raise ExportError(f"{directory}: the export was not verified. Fix: export again and pass its checks.")
    return directory


def run(export: str | None = None, run_dir: str | None = None, iterations: int = 2000,
        json_path: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from mnist_edge.runtime import FP32_FILE, INT8_FILE

    directory = resolve_export(export, run_dir)
    report = json.loads((directory / "report.json").read_text())
    machine = header(log)
    cores = usable_cores()
    log(f"model {report['model']} from {report['checkpoint']}; batch-1 latency over {iterations} runs, 1 thread")
    rows: dict[str, dict[str, Any]] = {}
    thread_counts = sorted({1, cores})
    for name, measure in (("tensorflow", lambda t: _tf_in_subprocess(report["checkpoint"], t, iterations // 4)),
                          ("onnxruntime fp32", lambda t: _onnxruntime(directory / FP32_FILE, t, iterations)),
                          ("onnxruntime int8", lambda t: _onnxruntime(directory / INT8_FILE, t, iterations))):
        log(f"measuring {name} ...")
        per_threads = {t: measure(t) for t in thread_counts}
        rows[name] = {"latency_us_p50": per_threads[1]["latency"]["p50"], "latency_us_p99": per_threads[1]["latency"]["p99"],
                      **{f"b256_img_s_{t}t": per_threads[t]["b256"] for t in thread_counts}}
    base = rows["tensorflow"]
    table(["runtime", "b1 p50 us", "b1 p99 us", *[f"b256 {t}t img/s" for t in thread_counts], "p50 speed-up vs TF"],
          [[name, f"{r['latency_us_p50']:,.0f}", f"{r['latency_us_p99']:,.0f}",
            *[f"{r[f'b256_img_s_{t}t']:,.0f}" for t in thread_counts],
            f"{base['latency_us_p50'] / r['latency_us_p50']:.2f}x"] for name, r in rows.items()], log)
    payload = {"benchmark": "infer", "machine": machine, "export": str(directory), "model": report["model"],
               "runtimes": rows, "sizes_bytes": {"fp32": report["fp32"]["size_bytes"], "int8": report["int8"]["size_bytes"]}}
    save(json_path, payload, log)
    return payload


if __name__ == "__main__":
    # TensorFlow at one thread count in a fresh process: `python -m mnist_dist.bench.infer CHECKPOINT THREADS ITERATIONS`.
    print(json.dumps(_tensorflow(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
