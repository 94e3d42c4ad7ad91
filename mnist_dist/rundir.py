"""A run directory across commands: what a re-run of the same --name may do.

The first command that trains a run writes its `config.json`. A later one with the same
--name continues the run only if it trains the same thing: it may change how long and how
(more epochs, other CPUs, another cluster), not what (the model, the batch, the rates, the
data). A finished run named again trains nothing and starts no worker.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator

from mnist_dist import ownership
from mnist_dist.config import TrainConfig
from mnist_dist.errors import RunError
from mnist_dist.store import LOCK_FILE, Location, StorageError

CONFIG_FILE, RESULT_FILE = "config.json", "result.json"
# What a re-run may change without changing what the run trains.
MAY_CHANGE = frozenset({"epochs", "eval_every", "steps_per_execution", "probe_test", "data_dir", "cpus_per_worker",
                        "gpus_per_worker", "pin_cpus", "address", "dashboard", "expose_ray", "storage", "name", "max_failures",
                        "keep_checkpoints", "resize_interval", "checkpoint_every"})
# The worker count and the per-worker batch may change together, as long as the global batch stays.
GROUP_FIELDS = frozenset({"workers", "min_workers", "batch_size"})


def run_dir(config: TrainConfig) -> Location:
    return Location.of(config.storage) / config.name


def read_json(run: Location, name: str) -> dict[str, Any] | None:
    """A JSON file of the run, or None when it is absent."""
    try:
        return (run / name).read_json()
    except ValueError as exc:
        raise RunError(f"{run / name}: not valid JSON ({exc}). Fix: pass a new --name, or restore the file.") from None


def settle(config: TrainConfig) -> TrainConfig:
    """The config with its run named and its storage absolute (Ray's workers have other working
    directories), settled in the driver; storage and data that cannot work fail here, in seconds."""
    storage = Location.of(config.storage)
    config = config.replace(name=config.name or time.strftime("mnist-%Y%m%d-%H%M%S"), storage=str(storage)).validate()
    storage.check_reachable()
    if config.teacher is not None:
        config = config.replace(teacher=settle_teacher(config))
    if not config.synthetic:
        from mnist_dist.data import settle_dir
        config = config.replace(data_dir=settle_dir(config.data_dir))
    return config


def settle_teacher(config: TrainConfig) -> str:
    """`--teacher` as the absolute location of the checkpoint the workers will load (their
    working directories differ), checked before any training: a finished run's best checkpoint,
    pinned here so that a resume or a restarted worker group learns from the same weights even
    if that run trains on, or a checkpoint folder itself."""
    from mnist_dist.checkpoint import MODEL_FILE, STATE_FILE
    from mnist_dist.results import BEST_FILE, best_checkpoint

    teacher = Location.of(config.teacher)
    fix = "Fix: --teacher takes the --storage/--name folder (or URI) of a finished run, or one of its checkpoint_* folders"
    if run_dir(config).contains(teacher):
        raise RunError(f"--teacher {teacher} is the run being trained. {fix}")
    if not teacher.is_dir():
        raise RunError(f"--teacher {teacher}: no such run folder. {fix}")
    if (teacher / BEST_FILE).exists():
        teacher, _best = best_checkpoint(teacher)
    elif not (teacher / STATE_FILE).exists():
        raise RunError(f"--teacher {teacher}: not a finished run (it has no {BEST_FILE}). {fix}, or finish this one first")
    if not ((teacher / STATE_FILE).exists() and (teacher / MODEL_FILE).exists()):
        raise RunError(f"--teacher {teacher}: the checkpoint is not there whole (it needs {MODEL_FILE} and {STATE_FILE}). {fix}")
    return str(teacher)


def differences(saved: TrainConfig, asked: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(what, saved, asked) for each setting that would change what the run trains."""
    changed = [(f.name, getattr(saved, f.name), getattr(asked, f.name)) for f in dataclasses.fields(TrainConfig)
               if f.name not in MAY_CHANGE | GROUP_FIELDS and getattr(saved, f.name) != getattr(asked, f.name)]
    if saved.global_batch_size != asked.global_batch_size:
        changed.append(("global batch (batch_size x workers)", saved.global_batch_size, asked.global_batch_size))
    return changed


def claim(config: TrainConfig) -> dict[str, Any] | None:
    """Check that `config` may train its run; returns result.json when the run already has
    every epoch asked for (nothing to train), else None, with config.json (re)written."""
    directory = run_dir(config)
    saved = read_json(directory, CONFIG_FILE)
    if saved is None:  # a run from before config.json: its result.json knows the config
        saved = (read_json(directory, RESULT_FILE) or {}).get("config")
    if saved is not None:
        saved_config = TrainConfig.from_saved(saved)
        changed = differences(saved_config, config)
        if changed:
            theirs = ", ".join(f"{name}={value!r}" for name, value, _ in changed)
            ours = ", ".join(f"{name}={value!r}" for name, _, value in changed)
            raise RunError(f"{directory}: this run was trained with {theirs}; this command asks for {ours}, which cannot "
                           "continue it. Fix: pass a new --name for a new run, or the run's own settings to continue it "
                           "(only epochs, the worker count at the same global batch, workers' CPUs and GPUs, cluster and "
                           "checkpoint settings may change).")
    result = read_json(directory, RESULT_FILE)
    if result is not None and result.get("epochs_completed", 0) >= config.epochs:
        return result
    (directory / CONFIG_FILE).write_json(config.to_dict())
    return None


def already_finished(result: dict[str, Any], log=print) -> dict[str, Any]:
    log(f"run {result['run_dir']} already has {result['epochs_completed']} epochs: nothing to train "
        f"(best epoch {result['best_epoch']}, validation accuracy {100 * result['best_val_accuracy']:.2f}%, "
        f"test accuracy {100 * result['test_accuracy']:.2f}%). Pass --epochs N above {result['epochs_completed']} to train on.")
    return result


@contextlib.contextmanager
def locked(run: Location, command: str, create: bool = True) -> Iterator[None]:
    """One writer per run (`Location.lock`), for as long as the command runs. With
    create=False a missing run is left alone: that is for the command itself to report."""
    if not create and not run.is_dir():
        yield
        return
    check_is_run_or_new(run)  # before the lock file is written into it
    with run.lock(command):
        yield


def check_is_run_or_new(run: Location) -> None:
    """Refuse to train into (or lock) a folder of other files: `--storage ~ --name Documents`."""
    names = [name for name, _ in run.entries() if name != LOCK_FILE]
    if names and not ownership.is_run(names):
        raise RunError(f"{run}: holds files ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}) "
                       "but no run of mnist-dist, so nothing is written there. Fix: pass a new --name, or a --storage "
                       "folder kept for runs.")


class StorageFailedMidRun(StorageError):
    """A run stopped because its storage failed under it (`storage_failed`)."""


def storage_failed(run: Location, error: BaseException) -> StorageFailedMidRun:
    """The one line for a run whose storage failed under it mid-run: where, the error, and the
    fix. What was cut off mid-write is never taken for good: a re-run resumes from the last
    checkpoint that was committed whole (Ray Train's snapshot, or DirectorySession's)."""
    reason, fix = run.failure(error)
    where = f"{run}" + (f" ({error.filename})" if getattr(error, "filename", None) else "")
    return StorageFailedMidRun(f"{where}: the run's storage failed while training ({reason}); the checkpoints committed "
                        f"before it are kept. Fix: {fix}, then run the same command again to resume.", reason)
