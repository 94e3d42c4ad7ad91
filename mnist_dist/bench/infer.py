"""`mnist-dist bench infer`: TensorFlow (the trained Keras model) against ONNX Runtime fp32
and int8, for one or several verified exports side by side in one run.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnist_dist.bench import header, save, table
from mnist_dist.machine import usable_cores


def _tensorflow(checkpoint: str, threads: int, iterations: int, seconds: float = 2.0) -> dict[str, Any]:
    """In a fresh process: the Keras model behind a tf.function, `threads` intra-op threads."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from mnist_dist.checkpoint import load_model
    from mnist_dist.timing import latency_us, throughput

    model, _ = load_model(checkpoint)
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    one, batch = _inputs()
    result = {"b256": throughput(lambda: infer(batch).numpy(), 256, seconds=seconds)}
    if threads == 1:
        result["latency"] = latency_us(lambda: infer(one).numpy(), iterations)
    return result


@functools.lru_cache(maxsize=1)
def _inputs() -> tuple[np.ndarray, np.ndarray]:
    # Real digits, not zeros: the int8 kernels' speed must not flatter constant input.
    from mnist_dist.data import load, normalize

    images = normalize(load(val_size=1000, train_limit=256).train_x[:256])
    return images[:1], images


def _onnxruntime(path: Path, threads: int, iterations: int, seconds: float = 2.0) -> dict[str, Any]:
    from mnist_dist.timing import latency_us, ort_session, throughput

    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    one, batch = _inputs()
    result = {"b256": throughput(lambda: session.run(None, {name: batch}), 256, seconds=seconds)}
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


def _tf_in_subprocess(checkpoint: str, threads: int, iterations: int, seconds: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "mnist_dist.bench.infer", checkpoint, str(threads), str(iterations),
                           str(seconds)],
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


def export_label(directory: Path, report: dict[str, Any], taken: set[str]) -> str:
    """`tf-tutorial`, or `tf-tutorial (r1)` when another export of that model came first."""
    label = report["model"]
    if label in taken:
        label = f"{label} ({directory.resolve().parent.name if directory.name == 'export' else directory.name})"
    taken.add(label)
    return label


def measure_export(directory: Path, report: dict[str, Any], iterations: int, seconds: float, thread_counts: list[int],
                   log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """TensorFlow (the export's checkpoint), ONNX Runtime fp32 and int8, their .ort twins
    (what ORT's minimal and mobile builds load), and int4 where the export has it: one row each."""
    from mnist_dist.export import report_checkpoint, sections_of

    checkpoint = report_checkpoint(report, directory)

    def onnxruntime(file: str) -> Callable[[int], dict[str, Any]]:
        return lambda threads: _onnxruntime(directory / file, threads, iterations, seconds)

    runtimes = [("tensorflow", lambda t: _tf_in_subprocess(str(checkpoint), t, iterations // 4, seconds),
                 report["fp32"]["tf_accuracy"], None)]
    runtimes += [(f"onnxruntime {name}", onnxruntime(section["file"]), section["ort_accuracy"], section["size_bytes"])
                 for name, section in sections_of(report).items()]  # every verified file the export has
    rows: dict[str, dict[str, Any]] = {}
    for name, measure, accuracy, size in runtimes:
        log(f"measuring {report['model']}: {name} ...")
        per_threads = {t: measure(t) for t in thread_counts}
        rows[name] = {"latency_us_p50": per_threads[1]["latency"]["p50"], "latency_us_p99": per_threads[1]["latency"]["p99"],
                      **{f"b256_img_s_{t}t": per_threads[t]["b256"] for t in thread_counts},
                      "test_accuracy": accuracy, "size_bytes": size}
    return rows


def run(exports: list[str] | None = None, runs: list[str] | None = None, iterations: int = 2000, seconds: float = 2.0,
        json_path: str | None = None, profile: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every export given (`--export`, then `--run`), side by side in one run; speed-ups are
    against the first export's TensorFlow, and latencies also against its int8 model."""
    from mnist_edge.runtime import FP32_FILE, INT8_FILE

    if not (seconds > 0 and iterations >= 1):
        from mnist_dist.export import ExportError
        raise ExportError(f"--seconds must be > 0 and --iterations >= 1, got {seconds} and {iterations}. "
                          "Fix: pass e.g. --seconds 2 --iterations 2000 (the defaults).")
    directories = [resolve_export(e, None) for e in exports or []] + [resolve_export(None, r) for r in runs or []]
    if not directories:
        from mnist_dist.export import ExportError
        raise ExportError("no export to measure. Fix: pass --export DIR or --run RUN (either may be repeated).")
    _inputs()  # the digits every runtime is timed on: missing MNIST is one line here, not a failed subprocess
    machine = header(log)
    thread_counts = sorted({1, usable_cores()})
    log(f"{len(directories)} export(s); batch-1 latency over {iterations} runs, 1 thread")
    measured, taken = [], set()
    for directory in directories:
        report = json.loads((directory / "report.json").read_text())
        label = export_label(directory, report, taken)
        measured.append({"label": label, "export": str(directory), "model": report["model"],
                         "runtimes": measure_export(directory, report, iterations, seconds, thread_counts, log)})
    first = measured[0]["runtimes"]
    table(["model", "runtime", "test acc", "size KB", "b1 p50 us", "b1 p99 us", *[f"b256 {t}t img/s" for t in thread_counts],
           "p50 vs first TF", "p50 / first int8"],
          [[entry["label"], name, f"{100 * r['test_accuracy']:.2f}%", f"{r['size_bytes'] / 1e3:,.0f}" if r["size_bytes"] else "",
            f"{r['latency_us_p50']:,.0f}", f"{r['latency_us_p99']:,.0f}", *[f"{r[f'b256_img_s_{t}t']:,.0f}" for t in thread_counts],
            f"{first['tensorflow']['latency_us_p50'] / r['latency_us_p50']:.2f}x",
            f"{r['latency_us_p50'] / first['onnxruntime int8']['latency_us_p50']:.2f}"]
           for entry in measured for name, r in entry["runtimes"].items()], log)
    profiles: dict[str, Any] = {}
    if profile:
        for entry in measured:
            directory = Path(entry["export"])
            for precision, file in (("fp32", FP32_FILE), ("int8", INT8_FILE)):
                nodes = node_profile(directory / file)
                profiles.setdefault(entry["label"], {})[precision] = nodes
                log(f"where the time goes, {entry['label']} {precision}, batch 1, 1 thread (ONNX Runtime profiler; medians):")
                table(["op", "node", "us"], [[op, node[-48:], f"{us:.0f}"] for op, node, us in nodes], log)
            floor_us, floor_bytes = weight_stream_floor_us(directory / FP32_FILE)
            log(f"floor: one numpy matrix-vector product over {entry['label']}'s largest fp32 weight matrix "
                f"({floor_bytes / 1e6:.2f} MB) takes {floor_us:.0f} us on this core (1 thread; OpenBLAS may use more)")
            profiles[entry["label"]]["largest_weight_matvec_us"] = floor_us
    payload = {"benchmark": "infer", "machine": machine, "iterations": iterations, "seconds": seconds, "exports": measured,
               "profile": profiles}
    save(json_path, payload, log)
    return payload


if __name__ == "__main__":
    # TensorFlow at one thread count in a fresh process: `python -m mnist_dist.bench.infer CHECKPOINT THREADS ITERATIONS SECONDS`.
    print(json.dumps(_tensorflow(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))
