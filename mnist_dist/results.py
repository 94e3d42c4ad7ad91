"""The two files a finished run leaves for what comes next (schema in docs/design.md):

- `best.json`: pointer to the best checkpoint by validation accuracy (read by `export --run`);
- `result.json`: the run's outcome for pipelines and CI.

Both are written whole or not at all (temp file + rename; a single put on object stores).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import MnistDistError

BEST_FILE = "best.json"
RESULT_FILE = "result.json"


class RunError(MnistDistError):
    """A run directory that cannot be used; the message says why and what to do."""


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch with the highest validation accuracy; the earliest one on a tie."""
    return max(history, key=lambda m: (m["val_accuracy"], -m["epoch"]))["epoch"]


def write(run_dir: str, name: str, payload: dict[str, Any]) -> None:
    from mnist_dist import objectstore
    from mnist_dist.checkpoint import write_json_atomic

    if not objectstore.is_uri(run_dir):
        write_json_atomic(Path(run_dir) / name, payload)
        return
    objectstore.write_bytes(objectstore.join(run_dir, name), json.dumps(payload, indent=2, sort_keys=True).encode())


def finish(config: TrainConfig, run_dir: str, best_dir: str, best_metrics: dict[str, Any],
           last_metrics: dict[str, Any], history: list[dict[str, Any]], wall_seconds: float, log=print,
           eval_dir: str | None = None, test: dict[str, float] | None = None) -> dict[str, Any]:
    """Write best.json and result.json, with the best checkpoint's test score.

    `best_dir` is where the checkpoint lives (maybe a bucket path); `eval_dir` a local copy.
    `test` is the score the training loop already took of those weights; without it the
    checkpoint is loaded and scored here, which costs this process a TensorFlow import.
    """
    from mnist_dist import machine
    from mnist_dist.checkpoint import load_state

    if test is None:
        from mnist_dist.evaluate import evaluate_checkpoint

        evaluation_started = time.perf_counter()
        state, test = evaluate_checkpoint(eval_dir or best_dir, config)
        wall_seconds += time.perf_counter() - evaluation_started  # the test score is part of the run
    else:
        state = load_state(eval_dir or best_dir)
    # Relative to the run directory: a run copied, moved or synced from a bucket stays whole.
    from mnist_dist import objectstore

    if objectstore.is_uri(run_dir):  # Ray's checkpoint path is on the bucket's filesystem, without its scheme
        best_dir = objectstore.join(run_dir, objectstore.name(best_dir))
    best = {"checkpoint": objectstore.name(best_dir), "epoch": best_metrics["epoch"],
            "val_accuracy": best_metrics["val_accuracy"], "global_step": best_metrics["global_step"]}
    summary = {
        "run_dir": run_dir,
        "best_checkpoint": best_dir,
        "best_epoch": best_metrics["epoch"],
        "best_val_accuracy": best_metrics["val_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "epochs_completed": last_metrics["epoch"],
        "global_step": last_metrics["global_step"],
        "workers": config.workers,
        "global_batch_size": config.global_batch_size,
        "train_seconds": last_metrics.get("train_seconds"),
        "wall_seconds": wall_seconds,
        "data_source": state.get("data_source"),
        "machine": machine.describe(),
        "history": history,
        "config": config.to_dict(),
    }
    write(run_dir, BEST_FILE, best)
    write(run_dir, RESULT_FILE, summary)
    log(f"best epoch {best['epoch']}: validation accuracy {100 * best['val_accuracy']:.2f}%, "
        f"test accuracy {100 * test['accuracy']:.2f}% (best of {last_metrics['epoch']} epochs, chosen on validation)")
    log(time_line(history, wall_seconds))
    log(f"best checkpoint: {best_dir}")
    log(f"run directory: {run_dir} (result.json, best.json)")
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


def require_run_dir(run_dir: str | Path) -> Path | str:
    """The run directory: a local Path, or the URI itself (objectstore)."""
    from mnist_dist import objectstore

    fix = "Fix: pass the --storage/--name folder of a training run."
    if objectstore.is_uri(run_dir):
        if not objectstore.exists(str(run_dir)):
            raise RunError(f"{run_dir}: run directory does not exist. {fix}")
        return str(run_dir)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory does not exist. {fix}")
    return run_dir


def best_checkpoint(run_dir: str | Path) -> tuple[Path | str, dict[str, Any]]:
    """The best checkpoint of a finished run, from best.json (a Path, or a URI for a URI run)."""
    from mnist_dist import objectstore

    run_dir = require_run_dir(run_dir)
    pointer = objectstore.join(str(run_dir), BEST_FILE)
    if isinstance(run_dir, Path):
        text, names = (run_dir / BEST_FILE).read_bytes() if (run_dir / BEST_FILE).is_file() else None, \
            [p.name for p in run_dir.iterdir()]
    else:
        text, names = objectstore.read_bytes(pointer), [name for name, _ in objectstore.listing(run_dir)]
    if text is None:
        has_checkpoints = any(name.startswith("checkpoint_") for name in names)
        hint = ("it has checkpoints but the run did not finish: re-run the same `mnist-dist train` command to resume it, "
                "or pass --checkpoint DIR") if has_checkpoints else "it holds no checkpoints: train first"
        raise RunError(f"{run_dir}: no {BEST_FILE}; {hint}.")
    try:
        best = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{pointer}: not valid JSON ({exc}).") from None
    # Always this run's own folder: best.json of older runs held absolute paths, which in a
    # copy point back at the original.
    checkpoint = objectstore.name(best["checkpoint"])
    return (run_dir / checkpoint if isinstance(run_dir, Path) else objectstore.join(run_dir, checkpoint)), best
