"""`mnist-dist bench infer`: TensorFlow (the trained Keras model) against ONNX Runtime fp32
and int8 from a verified export, in one run.

Batch-1 latency (median and p99, 1 thread) and batch-256 throughput with 1 thread and with
every core. TensorFlow's thread pools are fixed once it starts, so each TensorFlow thread
count is measured in its own fresh process.
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
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


def node_profile(path: Path, runs: int = 300) -> list[tuple[str, str, float]]:
    """(op, node, median µs) of each node at batch 1, 1 thread, from ONNX Runtime's own profiler."""
    import collections
    import tempfile

    from mnist_edge.runtime import open_session

    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(path, threads=1, profile_prefix=f"{tmp}/ort")
        name = session.get_inputs()[0].name
        one, _ = _inputs()
        for _ in range(runs):
            session.run(None, {name: one})
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations[(event["args"].get("op_name", "?"), event["name"][: -len("_kernel_time")])].append(event["dur"])
    return [(op, node, float(np.median(d))) for (op, node), d in durations.items()]


def weight_stream_floor_us(path: Path, iterations: int = 500) -> tuple[float, int]:
    """Batch-1 time of a matrix-vector product over the model's largest weight matrix, in numpy:
    at batch 1 every weight is read once per image, so this bounds what any runtime can do."""
    import onnx
    from onnx import numpy_helper

    from mnist_dist.timing import latency_us

    largest = max((numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer), key=lambda a: a.size)
    weights = np.ascontiguousarray(largest.reshape(largest.shape[0], -1).astype(np.float32))
    vector = np.ones((1, weights.shape[0]), np.float32)
    return latency_us(lambda: vector @ weights, iterations)["p50"], weights.nbytes


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
        json_path: str | None = None, profile: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    from mnist_edge.runtime import FP32_FILE, INT8_FILE

    from mnist_dist.export import report_checkpoint

    directory = resolve_export(export, run_dir)
    report = json.loads((directory / "report.json").read_text())
    checkpoint = report_checkpoint(report, directory)
    machine = header(log)
    cores = usable_cores()
    log(f"model {report['model']} from {checkpoint}; batch-1 latency over {iterations} runs, 1 thread")
    rows: dict[str, dict[str, Any]] = {}
    thread_counts = sorted({1, cores})
    for name, measure in (("tensorflow", lambda t: _tf_in_subprocess(str(checkpoint), t, iterations // 4)),
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
    profiles = {}
    if profile:
        for name, file in (("fp32", FP32_FILE), ("int8", INT8_FILE)):
            profiles[name] = node_profile(directory / file)
            log(f"where the time goes, {name}, batch 1, 1 thread (ONNX Runtime profiler; medians):")
            table(["op", "node", "us"], [[op, node[-48:], f"{us:.0f}"] for op, node, us in profiles[name]], log)
        floor_us, floor_bytes = weight_stream_floor_us(directory / FP32_FILE)
        log(f"floor: one numpy matrix-vector product over the largest fp32 weight matrix ({floor_bytes / 1e6:.1f} MB) "
            f"takes {floor_us:.0f} us on this core (1 thread; OpenBLAS may use more)")
        profiles["largest_weight_matvec_us"] = floor_us
    payload = {"benchmark": "infer", "profile": profiles, "machine": machine, "export": str(directory), "model": report["model"],
               "runtimes": rows, "sizes_bytes": {"fp32": report["fp32"]["size_bytes"], "int8": report["int8"]["size_bytes"]}}
    save(json_path, payload, log)
    return payload


if __name__ == "__main__":
    # TensorFlow at one thread count in a fresh process: `python -m mnist_dist.bench.infer CHECKPOINT THREADS ITERATIONS`.
    print(json.dumps(_tensorflow(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
