"""Training throughput, side by side in one run, same model, global batch and precision:

  (a) plain single-process Keras `model.fit` (the baseline),
  (b) mnist-dist through Ray Train with 1 worker,
  (c) mnist-dist through Ray Train with 2 workers (MultiWorkerMirroredStrategy).

Steady state: the figure is the last epoch's images/s, the first epoch (tracing, warm-up)
is excluded; evaluation time is never counted. Prints a table and writes JSON.

  python benchmarks/train_throughput.py --global-batch 256 --epochs 2 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def plain_keras(model_name: str, global_batch: int, epochs: int, limit: int) -> float:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from mnist_dist.data import load, normalize
    from mnist_dist.models import build

    data = load(train_limit=limit)
    x, y = normalize(data.train_x), data.train_y
    model = build(model_name)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    model.fit(x, y, batch_size=global_batch, epochs=epochs, verbose=0, callbacks=[timer], shuffle=True)
    return (len(y) // global_batch) * global_batch / timer.seconds


def ray_workers(model_name: str, global_batch: int, epochs: int, limit: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as storage:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "train", "--model", model_name,
                               "--workers", str(workers), "--batch-size", str(global_batch // workers),
                               "--epochs", str(epochs), "--train-limit", str(limit), "--eval-every", "100000",
                               "--storage", storage, "--name", "bench"], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        result = json.loads((Path(storage) / "bench" / "result.json").read_text())
    return {"img_s": result["history"][-1]["images_per_second"], "wall_seconds": wall,
            "train_seconds": result["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf-tutorial")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    parser.add_argument("--train-limit", type=int, default=55000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import numpy, ray, tensorflow, keras  # noqa: E401 - versions for the record
    rows = {"plain keras fit": plain_keras(args.model, args.global_batch, args.epochs, args.train_limit)}
    details = {}
    for workers in (1, 2):
        details[workers] = ray_workers(args.model, args.global_batch, args.epochs, args.train_limit, workers)
        rows[f"ray {workers} worker{'s' * (workers > 1)}"] = details[workers]["img_s"]
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"tensorflow {tensorflow.__version__}, keras {keras.__version__}, ray {ray.__version__}, numpy {numpy.__version__}")
    print(f"model {args.model}, global batch {args.global_batch}, fp32, last of {args.epochs} epochs on {args.train_limit} images")
    print(f"{'setup':<18} {'img/s':>8} {'vs plain':>9}")
    base = rows["plain keras fit"]
    for name, value in rows.items():
        print(f"{name:<18} {value:8.0f} {value / base:8.2f}x")
    for workers, d in details.items():
        print(f"ray {workers} worker(s): wall {d['wall_seconds']:.1f} s, of which training {d['train_seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ray": details, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
