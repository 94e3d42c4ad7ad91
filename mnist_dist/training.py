"""Train a run to `config.epochs`: on Ray Train workers (the default), or in this process.

Either way the driver settles the run first (a name, absolute paths, reachable storage,
verified data), takes its lock, and checks a re-run against the run's config.json
(mnist_dist.rundir), all before Ray or TensorFlow starts.
"""
from __future__ import annotations

import time
from typing import Any

from mnist_dist import rundir
from mnist_dist.config import TrainConfig
from mnist_dist.progress import Clock


def run(config: TrainConfig, in_process: bool = False, log=print, clock: Clock | None = None,
        callbacks: tuple = ()) -> dict[str, Any]:
    """Trains to `config.epochs` and returns the content of result.json. `clock`: when the
    command started, for the start-up lines (default: now); `callbacks`: Ray Train's, on Ray."""
    clock = clock or Clock()
    config = rundir.settle(config.replace(workers=1) if in_process else config)
    with rundir.locked(rundir.run_dir(config), "train --in-process" if in_process else "train"):
        if (finished := rundir.claim(config)) is not None:
            return rundir.already_finished(finished, log)
        if in_process:
            return _train_in_process(config, log, clock)
        from mnist_dist.launcher import fit, stop_ray
        try:
            return fit(config, log, clock, callbacks)
        finally:
            stop_ray()


def _train_in_process(config: TrainConfig, log, clock: Clock) -> dict[str, Any]:
    """One process, the default strategy, checkpoints through a DirectorySession."""
    from mnist_dist import process_setup, results
    from mnist_dist.loop import train
    from mnist_dist.sessions import DirectorySession
    from mnist_dist.store import StorageError

    log(clock.line("training in this process, without Ray; importing TensorFlow ..."))
    process_setup.configure_process(config.cpus_per_worker, use_gpu=False)
    run = rundir.run_dir(config)
    started = time.perf_counter()
    try:
        final = train(config, DirectorySession(run), log=log, clock=clock)
    except (OSError, StorageError) as exc:
        # A write of the run's (its checkpoints, progress, events) that failed: one line.
        if run.failed_in(exc):
            raise rundir.storage_failed(run, exc) from None
        raise
    history = final["history"]
    best = next(m for m in history if m["epoch"] == results.best_epoch(history))
    best_name = f"checkpoint_epoch{best['epoch']:03d}"
    with (run / best_name).local_copy() as local:
        return results.finish(config, run, best_name, local, best, history[-1], history, time.perf_counter() - started,
                              log, test=final.get("test"))
