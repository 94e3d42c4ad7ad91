"""`mnist-dist bench train`: training throughput side by side, same model, global batch
and precision:

  (a) plain single-process Keras `model.fit` (the baseline), and the same with Keras'
      `steps_per_execution` set to the project's own default, for reference;
  (b) the project's `strategy.run` step in one process (the default strategy);
  (c) the project through Ray Train with each requested number of workers
      (MultiWorkerMirroredStrategy when more than one);
  (d) with `--peer-python`, what a user would run instead (mnist_dist.bench.peers), for the
      most workers asked: Ray's TensorflowTrainer example with tf_keras `fit`, and
      TensorFlow's own TF_CONFIG recipe without Ray.

Each setup runs in its own fresh process (thread pools are per process) for two epochs of
`--steps` global batches; the second epoch is measured, so tracing and warm-up are
excluded, and no evaluation is counted. For Ray it also reports the start-up overhead:
the wall time of the whole `mnist-dist train` minus its training time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnist_dist.bench import header, save, table
from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.machine import usable_cores


def _plain_fit(model_name: str, global_batch: int, precision: str, steps: int, steps_per_execution: int = 1) -> dict[str, Any]:
    """(a), in this process: what a user gets from `compile` + `fit` with default settings."""
    import keras

    from mnist_dist.data import load, normalize
    from mnist_dist.models import build
    from mnist_dist.optimizers import make_optimizer

    data = load(train_limit=steps * global_batch, val_size=1000)
    model = build(model_name, precision=precision)
    defaults = TrainConfig()  # the same optimizer as (b) and (c), at a constant rate
    model.compile(optimizer=make_optimizer(defaults, defaults.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=steps_per_execution)
    epoch_seconds = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.start)

    model.fit(normalize(data.train_x), data.train_y, batch_size=global_batch, epochs=2, verbose=0,
              callbacks=[Timer()], shuffle=True)
    return {"img_s": steps * global_batch / epoch_seconds[-1], "jit_compile": bool(model.jit_compile)}


def _project_step(model_name: str, global_batch: int, precision: str, steps: int) -> dict[str, Any]:
    """(b), in this process: the training loop the Ray workers run, with the default strategy."""
    from mnist_dist import training

    with tempfile.TemporaryDirectory() as storage:
        config = TrainConfig(model=model_name, batch_size=global_batch, precision=precision, epochs=2,
                             train_limit=steps * global_batch, val_size=1000, eval_every=10**9,
                             cpus_per_worker=usable_cores(), storage=storage, name="bench")
        result = training.run(config, in_process=True, log=lambda _line: None)
    return {"img_s": result["history"][-1]["images_per_second"]}


def _ray(model_name: str, global_batch: int, precision: str, steps: int, workers: int, allreduce: str) -> dict[str, Any]:
    """(c): the real command line, so start-up is measured as a user meets it."""
    cpus = max(1, usable_cores() // workers)
    with tempfile.TemporaryDirectory() as storage:
        command = [sys.executable, "-m", "mnist_dist.cli", "train", "--model", model_name, "--workers", str(workers),
                   "--batch-size", str(global_batch // workers), "--precision", precision, "--exchange-dtype", allreduce, "--epochs", "2",
                   "--train-limit", str(steps * global_batch), "--val-size", "1000", "--eval-every", str(10**9),
                   "--cpus-per-worker", str(cpus), "--storage", storage, "--name", "bench"]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        result = json.loads((Path(storage) / "bench" / "result.json").read_text())
    last = result["history"][-1]
    return {"img_s": last["images_per_second"], "wall_seconds": wall,
            "spot_check_ms": 1000 * last.get("spot_check_seconds", 0.0) / max(1, last.get("spot_checks", 0)),
            "train_seconds": result["train_seconds"], "startup_overhead_seconds": wall - result["train_seconds"],
            "cpus_per_worker": cpus}


def _median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median img/s (the lower middle one of an even count)."""
    return sorted(results, key=lambda r: r["img_s"])[(len(results) - 1) // 2]


def summarize(runs: dict[str, list[dict[str, Any]]], baseline: str = "plain keras fit") -> tuple[dict, dict]:
    """(setups, ratios) from every round's runs: each setup's median run with all its img/s,
    and the median over rounds of its ratio to the baseline's run of the same round."""
    setups = {name: {**_median_run(results), "img_s_runs": [r["img_s"] for r in results]} for name, results in runs.items()}
    ratios = {name: median_ratio(results, runs[baseline]) for name, results in runs.items()}
    return setups, ratios


def median_ratio(runs: list[dict[str, Any]], against: list[dict[str, Any]], key: str = "img_s") -> float:
    """The median over rounds of runs[i][key] / against[i][key]: each round against its own."""
    return float(np.median([r[key] / a[key] for r, a in zip(runs, against)]))


def _in_subprocess(setup: str, model: str, global_batch: int, precision: str, steps: int, *extra: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "mnist_dist.bench.train", setup, model, str(global_batch),
                           precision, str(steps), *map(str, extra)], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode:
        raise RuntimeError(f"bench setup {setup} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model: str = "tf-tutorial", global_batch: int = 256, precision: str = "fp32", steps: int = 100,
        workers: tuple[int, ...] = (1, 2), json_path: str | None = None, allreduce: str = "auto", rounds: int = 1,
        peer_python: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    # Every setup holds out 1,000 validation images of MNIST's 60,000; an epoch longer than
    # what is left would be cut short, and its img/s overstated.
    if not 1 <= steps * global_batch <= 59_000:
        raise ConfigError(f"--steps {steps} x global batch {global_batch} = {steps * global_batch:,} images per epoch; "
                          f"the benchmark trains on at most 59,000. Fix: --steps between 1 and {59_000 // global_batch}")
    for n in workers:
        if global_batch % n:
            raise ConfigError(f"global batch {global_batch} does not split over {n} workers; pick a multiple of {n}")
    machine = header(log)
    reduced_in = TrainConfig(precision=precision, allreduce=allreduce).allreduce_dtype
    log(f"model {model}, global batch {global_batch}, precision {precision} (Ray workers all-reduce gradients in "
        f"{reduced_in}), {steps} steps per epoch, second of 2 epochs measured")
    per_call = TrainConfig().steps_per_execution
    plan = [("plain keras fit", lambda: _in_subprocess("plain", model, global_batch, precision, steps)),
            (f"plain keras fit, steps_per_execution={per_call}",
             lambda: _in_subprocess("plain", model, global_batch, precision, steps, per_call)),
            ("project step, 1 process", lambda: _in_subprocess("step", model, global_batch, precision, steps))]
    plan += [(f"ray, {n} worker{'s' * (n > 1)}", lambda n=n: _ray(model, global_batch, precision, steps, n, allreduce)) for n in workers]
    most = max(workers)
    project, peer_names = f"ray, {most} worker{'s' * (most > 1)}", {}
    if peer_python:
        from mnist_dist.bench import peers

        if most > 1 and reduced_in != "fp32":
            log(f"the peers' MultiWorkerMirroredStrategy all-reduces gradients in fp32, the project's in {reduced_in}")
        for mode, what in peers.MODES.items():
            peer_names[mode] = f"{what}, {most} worker{'s' * (most > 1)}"
            # The images and optimizer of (a), at its constant rate.
            recipe = TrainConfig(model=model, workers=most, batch_size=global_batch // most, precision=precision,
                                 lr_decay=1.0, train_limit=steps * global_batch, val_size=1000)
            plan.append((peer_names[mode], lambda mode=mode, recipe=recipe: peers.measure(peer_python, mode, recipe, epochs=2, steps=steps)))
    # Round after round of every setup: a VM's speed drifts over minutes (docs/benchmarks.md),
    # so each ratio compares runs of the same round, and the median ratio is reported.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in plan}
    for round_number in range(1, rounds + 1):
        for number, (name, measure) in enumerate(plan, 1):
            log(f"[{'round %d, ' % round_number if rounds > 1 else ''}{number}/{len(plan)}] {name} ...")
            runs[name].append(measure())
    setups, ratios = summarize(runs)
    table(["setup", "img/s", "vs plain fit", "wall s", "of which training s", "start-up overhead s", "spot check ms/call"]
          + (["img/s of each round"] if rounds > 1 else []),
          [[name, f"{s['img_s']:,.0f}", f"{ratios[name]:.2f}x",
            *([f"{s['wall_seconds']:.1f}", f"{s['train_seconds']:.1f}", f"{s['startup_overhead_seconds']:.1f}"]
              if "wall_seconds" in s else ["", "", ""]),
            f"{s['spot_check_ms']:.2f}" if "spot_check_ms" in s else "",
            *([" / ".join(f"{x:,.0f}" for x in s["img_s_runs"])] if rounds > 1 else [])] for name, s in setups.items()], log)
    payload = {"benchmark": "train", "machine": machine, "model": model, "global_batch": global_batch,
               "precision": precision, "allreduce": reduced_in, "steps": steps, "rounds": rounds, "setups": setups,
               "ratios_to_plain_fit": ratios}
    # The most workers against one process of the project's own step: what distribution costs.
    payload["against_one_process"] = median_ratio(runs[project], runs["project step, 1 process"])
    log(f"{project} against project step, 1 process: {payload['against_one_process']:.2f}x the img/s")
    if peer_names:
        payload["peers"] = compare_with_peers(runs, project, peer_names, log)
    save(json_path, payload, log)
    return payload


def compare_with_peers(runs: dict[str, list[dict[str, Any]]], project: str, peer_names: dict[str, str],
                       log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """The project's Ray run against each peer, img/s and start-up overhead, round by round."""
    ratios = {}
    for mode, name in peer_names.items():
        ratios[mode] = {"setup": name, "img_s": median_ratio(runs[project], runs[name]),
                        "startup_overhead": median_ratio(runs[project], runs[name], "startup_overhead_seconds")}
        log(f"{project} against {name}: {ratios[mode]['img_s']:.2f}x the img/s, "
            f"{ratios[mode]['startup_overhead']:.2f}x the start-up overhead")
    return ratios


if __name__ == "__main__":
    # One setup in a fresh process:
    # `python -m mnist_dist.bench.train plain|step MODEL BATCH PRECISION STEPS [STEPS_PER_EXECUTION]`.
    setup, model_name, batch, precision_name, *numbers = sys.argv[1:]
    measure = {"plain": _plain_fit, "step": _project_step}[setup]
    print(json.dumps(measure(model_name, int(batch), precision_name, *map(int, numbers))))
