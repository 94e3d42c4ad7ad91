"""Training in this process, without Ray: the default strategy, checkpoints in a folder."""
from __future__ import annotations

import time
from typing import Any

from mnist_dist.config import TrainConfig


def train_in_process(config: TrainConfig, log=print) -> dict[str, Any]:
    from mnist_dist import objectstore, rundir
    from mnist_dist.results import RunError

    if objectstore.is_uri(config.storage):
        raise RunError(f"--in-process keeps its checkpoints in a local folder, not at {config.storage}. "
                       "Fix: drop --in-process (Ray Train writes checkpoints to the URI), or pass a local --storage.")
    config = rundir.settle(config.replace(workers=1))
    with rundir.locked(rundir.run_dir(config), "train --in-process"):
        if (finished := rundir.claim(config)) is not None:
            return rundir.already_finished(finished, log)
        return _train(config, log)


def _train(config: TrainConfig, log) -> dict[str, Any]:
    from mnist_dist import process_setup, results, rundir
    from mnist_dist.loop import train
    from mnist_dist.sessions import DirectorySession

    process_setup.configure_process(config.cpus_per_worker, use_gpu=False)
    run_dir = rundir.run_dir(config)
    session = DirectorySession(run_dir)
    started = time.perf_counter()
    final = train(config, session, log=log)
    history = final["history"]
    best = next(m for m in history if m["epoch"] == results.best_epoch(history))
    best_dir = f"{run_dir}/checkpoint_epoch{best['epoch']:03d}"
    return results.finish(config, run_dir, best_dir, best, history[-1], history, time.perf_counter() - started, log,
                          test=final.get("test"))
