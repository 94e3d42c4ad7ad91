"""Inference, side by side in one run: TensorFlow (the trained Keras model) against ONNX
Runtime fp32 and int8 from a verified export. Batch-1 latency (median, p99; 1 thread) and
batch-256 throughput (1 and 2 threads).

  python benchmarks/infer_latency.py --export runs/RUN/export [--json infer.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="export directory with report.json")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from mnist_dist.checkpoint import load_model
    from mnist_dist.timing import latency_us, ort_session, throughput

    export = Path(args.export)
    report = json.loads((export / "report.json").read_text())
    model, _ = load_model(report["checkpoint"])
    one, batch = np.zeros((1, 28, 28, 1), np.float32), np.zeros((256, 28, 28, 1), np.float32)
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    rows = {"tensorflow": {"latency": latency_us(lambda: infer(one).numpy(), args.iterations // 4),
                           "b256_1t": throughput(lambda: infer(batch).numpy(), 256)}}
    for name, file in (("ort fp32", "model.onnx"), ("ort int8", "model.int8.onnx")):
        s1, s2 = ort_session(export / file, 1), ort_session(export / file, 2)
        rows[name] = {"latency": latency_us(lambda: s1.run(None, {"image": one}), args.iterations),
                      "b256_1t": throughput(lambda: s1.run(None, {"image": batch}), 256),
                      "b256_2t": throughput(lambda: s2.run(None, {"image": batch}), 256)}
    print(f"model {report['model']} from {report['checkpoint']}; {os.cpu_count()} CPUs")
    print(f"{'runtime':<11} {'b1 p50 us':>10} {'b1 p99 us':>10} {'b256 1t img/s':>14} {'b256 2t img/s':>14} {'p50 vs TF':>10}")
    base = rows["tensorflow"]["latency"]["p50"]
    for name, r in rows.items():
        print(f"{name:<11} {r['latency']['p50']:10.0f} {r['latency']['p99']:10.0f} {r['b256_1t']:14.0f} "
              f"{r.get('b256_2t', float('nan')):14.0f} {base / r['latency']['p50']:9.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
