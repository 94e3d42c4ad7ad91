"""The two files a finished run leaves for what comes next (schema in docs/design.md):

- `best.json`: pointer to the best checkpoint by validation accuracy (read by `export --run`);
- `result.json`: the run's outcome for pipelines and CI.

Both are written whole or not at all (temp file + rename; a single put on object stores).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mnist_dist import spot
from mnist_dist.config import TrainConfig
from mnist_dist.errors import RunError
from mnist_dist.store import Location, basename

BEST_FILE = "best.json"
RESULT_FILE = "result.json"


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch with the highest validation accuracy; the earliest one on a tie."""
    return max(history, key=lambda m: (m["val_accuracy"], -m["epoch"]))["epoch"]


def finish(config: TrainConfig, run: Location, best_name: str, local_best: Path, best_metrics: dict[str, Any],
           last_metrics: dict[str, Any], history: list[dict[str, Any]], wall_seconds: float, log=print,
           test: dict[str, float] | None = None) -> dict[str, Any]:
    """Write best.json and result.json, with the best checkpoint's test score.

    `best_name` is the checkpoint's folder in the run; `local_best` a local copy of it.
    `test` is the score the training loop already took of those weights; without it the
    checkpoint is loaded and scored here, which costs this process a TensorFlow import.
    """
    from mnist_dist import machine
    from mnist_dist.checkpoint import load_state

    if test is None:
        from mnist_dist.evaluate import evaluate_checkpoint

        evaluation_started = time.perf_counter()
        state, test = evaluate_checkpoint(local_best, config)
        wall_seconds += time.perf_counter() - evaluation_started  # the test score is part of the run
    else:
        state = load_state(local_best)
    # Relative to the run directory: a run copied, moved or synced from a bucket stays whole.
    best = {"checkpoint": best_name, "epoch": best_metrics["epoch"],
            "val_accuracy": best_metrics["val_accuracy"], "global_step": best_metrics["global_step"]}
    summary = {
        "run_dir": str(run),
        "best_checkpoint": str(run / best_name),
        "best_epoch": best_metrics["epoch"],
        "best_val_accuracy": best_metrics["val_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "epochs_completed": last_metrics["epoch"],
        "global_step": last_metrics["global_step"],
        "workers": config.workers,
        "global_batch_size": config.global_batch_size,
        **spot.read(run),  # resizes and lost_steps
        "train_seconds": last_metrics.get("train_seconds"),
        "wall_seconds": wall_seconds,
        "data_source": state.get("data_source"),
        "machine": machine.describe(),
        "history": history,
        "config": config.to_dict(),
    }
    (run / BEST_FILE).write_json(best)
    (run / RESULT_FILE).write_json(summary)
    log(f"best epoch {best['epoch']}: validation accuracy {100 * best['val_accuracy']:.2f}%, "
        f"test accuracy {100 * test['accuracy']:.2f}% (best of {last_metrics['epoch']} epochs, chosen on validation)")
    log(time_line(history, wall_seconds))
    log(f"best checkpoint: {run / best_name}")
    log(f"run directory: {run} (result.json, best.json)")
    return summary


def time_line(history: list[dict[str, Any]], wall_seconds: float) -> str:
    """Where this command's wall time went. Epochs trained before a resume are not its time."""
    started = time.time() - wall_seconds
    here = [m for m in history if m.get("finished_at", started) >= started]
    train_seconds = sum(m.get("epoch_train_seconds") or 0.0 for m in here)
    line = (f"time: {wall_seconds:.1f} s wall, of which {train_seconds:.1f} s training and {wall_seconds - train_seconds:.1f} s "
            "start-up, evaluation, checkpoints and the test score")
    if len(here) < len(history):
        before = len(history) - len(here)
        line += f" ({'epoch 1 was' if before == 1 else f'epochs 1-{before} were'} trained before this command resumed the run)"
    return line


def require_run_dir(run: Location) -> Location:
    if not run.is_dir():
        raise RunError(f"{run}: run directory does not exist. Fix: pass the --storage/--name folder of a training run.")
    return run


def best_checkpoint(run: Location) -> tuple[Location, dict[str, Any]]:
    """The best checkpoint of a finished run, from best.json."""
    require_run_dir(run)
    try:
        best = (run / BEST_FILE).read_json()
    except ValueError as exc:
        raise RunError(f"{run / BEST_FILE}: not valid JSON ({exc}).") from None
    if best is None:
        has_checkpoints = any(name.startswith("checkpoint_") for name, _ in run.entries())
        hint = ("it has checkpoints but the run did not finish: re-run the same `mnist-dist train` command to resume it, "
                "or pass --checkpoint DIR") if has_checkpoints else "it holds no checkpoints: train first"
        raise RunError(f"{run}: no {BEST_FILE}; {hint}.")
    # Always this run's own folder: best.json of older runs held absolute paths, which in a
    # copy point back at the original.
    return run / basename(best["checkpoint"]), best
