"""Run the training loop on N Ray Train workers (MultiWorkerMirroredStrategy, TF_CONFIG from mnist_dist.ray_backend).

The driver starts an embedded local Ray unless given an address (or run inside a Ray
job), keeps the top-k checkpoints by validation accuracy with Ray's CheckpointConfig,
and leaves best.json and result.json in the run directory (see mnist_dist.results).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from mnist_dist import objectstore, results, rundir
from mnist_dist.rundir import run_dir, storage_path
from mnist_dist.config import TrainConfig

# Test hook: when set, each worker writes `rank<R>.pid` and `rank<R>.node` (its Ray node ID) there,
# so a test can kill a real worker, or its whole node, and see where each rank ran.
PID_DIR_ENV = "MNIST_DIST_PID_DIR"


class RaySession:
    """The loop's view of Ray Train: rank, restore, and report-with-checkpoint."""

    def __init__(self, run_dir: str) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank, self.local_world_size = context.get_local_rank(), context.get_local_world_size()
        self.run_dir = run_dir

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:  # downloads when storage is remote
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None:
        import ray.train

        # Ray Train V2 keeps metrics only when they come with a checkpoint, and report()
        # is a barrier: every rank reports, each adding its files to the same folder.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=f"checkpoint_epoch{epoch:03d}")


DIVERGED_FILE = "diverged.json"  # rank 0 tells the driver that the loss stopped being a number


def worker_main(config_dict: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    from mnist_dist import runtime

    config = TrainConfig.from_dict(config_dict)
    if not config.synthetic:
        from mnist_dist.data import dir_on_this_node
        config = config.replace(data_dir=str(dir_on_this_node(config.data_dir)))
    session = RaySession(run_dir(config))
    pinned = pin_worker(config, session)  # before TensorFlow starts its thread pools
    runtime.configure_process(config.cpus_per_worker, use_gpu=config.gpus_per_worker > 0)
    if os.environ.get(PID_DIR_ENV):
        import ray

        Path(os.environ[PID_DIR_ENV], f"rank{session.rank}.pid").write_text(str(os.getpid()))
        Path(os.environ[PID_DIR_ENV], f"rank{session.rank}.node").write_text(ray.get_runtime_context().get_node_id())
    runtime.quiet_worker_logs()
    if pinned and session.rank == 0:
        runtime.console(f"worker threads pinned: each worker keeps to its own {config.cpus_per_worker} CPU(s) of this node "
                        f"(rank 0: CPU {', '.join(map(str, sorted(pinned)))}; --no-pin-cpus to turn off)")
    plan = runtime.device_plan(config.cpus_per_worker, config.gpus_per_worker)
    if plan.use_gpu and session.rank == 0:
        runtime.console(runtime.gpu_line(plan, runtime.cluster_size()))
    strategy = runtime.make_strategy(plan)
    from mnist_dist.loop import TrainingDiverged, train

    try:
        train(config, session, strategy=strategy, log=runtime.console)
    except TrainingDiverged as exc:
        # Every rank checks the same all-reduced loss, so all stop at this step together and
        # return: the driver prints rank 0's one line, and Ray Train's controller logs no
        # worker tracebacks. (Ray Train hands the driver only metrics that came with a checkpoint.)
        if session.rank == 0:
            results.write(run_dir(config), DIVERGED_FILE, {"error": str(exc)})


def pin_worker(config: TrainConfig, session: RaySession) -> set[int] | None:
    """Pin this CPU worker's threads when the run's workers fill the node (runtime.cores_to_pin)."""
    from mnist_dist import runtime

    if not config.pin_cpus or config.gpus_per_worker or not hasattr(os, "sched_setaffinity"):
        return None
    cores = runtime.cores_to_pin(session.local_rank, session.local_world_size, config.cpus_per_worker,
                                 os.sched_getaffinity(0))
    if cores:
        runtime.pin_threads(cores)
    return cores


def init_ray(config: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    # Not MNIST_DATA_DIR: the driver settles it into the config as an absolute path (data.settle_dir).
    env_vars = {k: v for k, v in os.environ.items() if k in ("MNIST_DIST_CACHE", PID_DIR_ENV)}
    runtime_env = {"env_vars": {**env_vars, "TF_CPP_MIN_LOG_LEVEL": "2"}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside `ray job submit` / a RayJob: the job's runtime_env already applies, and Ray
        # refuses a driver that sets the same keys again.
        ray.init(address=address or "auto", log_to_driver=True)
    elif address:  # an existing cluster: `auto` or `ray://host:10001`
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # Ray Train's preemption watcher is one more actor process to start on every run,
        # and it logs an error line at start-up; one local machine has nothing to preempt.
        # The driver's values below propagate to Ray Train's controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The controller polls its workers every 2 s by default, and each phase of start-up
        # and teardown waits for a poll: a no-op 2-worker Ray Train run took 18.4 s of wall
        # time here, 15.0-15.9 s when polling every 0.5 s, and without the dashboard 13.1-13.7 s
        # at 0.5 s against 11.3-12.6 s at 0.2 s. Training speed did not change (two pairs),
        # and `train --epochs 1` spent 18.2-19.9 s outside training at 0.2 s, 18.8-19.2 s at 0.5 s.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        if not config.dashboard:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_placement_group_cleaner"
        # address="local": always a Ray of its own. Without it, ray.init() joins any cluster a
        # `ray start` left running on this machine (and then refuses num_cpus).
        ray.init(address="local", **local_ray_options(config), runtime_env=runtime_env, log_to_driver=True,
                 logging_level="WARNING")


def stop_ray() -> None:
    """Stops the embedded local Ray, or disconnects from a cluster, once the run is over.

    Left to interpreter exit, Ray first sleeps 0.5 s so that workers' log lines can finish
    printing; once the run's results are printed, the workers' last lines are long in. A
    process ended 2.05 s after its last line that way and 1.54 s after it with an explicit
    `ray.shutdown()` (two runs each). What follows in the same process (the pipeline's
    export) also gets the CPUs the Ray processes held.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()


def quiet_placement_group_cleaner() -> None:
    """Ray worker-process setup hook of the dashboard-less local Ray (see local_ray_options).

    Ray Train's placement-group cleaner asks the State API, which the dashboard serves,
    whether the controller is alive once a second, and logs each failed query as a warning
    that Ray forwards to the driver's console. Its own failures stay visible (ERROR).
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def local_ray_options(config: TrainConfig) -> dict[str, Any]:
    """`ray.init` arguments of the embedded local Ray (no address)."""
    if not config.dashboard:
        # Without the dashboard there is no State API for Ray Train's state actor to poll.
        # Its placement-group cleaner cannot check on the controller either (its warnings are
        # quieted by `quiet_placement_group_cleaner`); on one machine the driver's Ray
        # shutdown removes the placement group anyway.
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    # The dashboard is about ten more processes, and while a run trains it answers that
    # cleaner's State API query every second. Without it, a 2-worker run on 2 cores
    # finished 2.2-2.8 s sooner and trained 1-6% faster (two interleaved pairs; docs/benchmarks.md).
    return {"num_cpus": max(os.cpu_count() or 1, config.workers * config.cpus_per_worker),
            "include_dashboard": config.dashboard}


def scaling_config(config: TrainConfig):
    """What each of the N workers asks Ray for (CPUs, and GPUs when --gpus-per-worker > 0)."""
    from ray.train import ScalingConfig

    from mnist_dist import runtime

    plan = runtime.device_plan(config.cpus_per_worker, config.gpus_per_worker)
    return ScalingConfig(num_workers=config.workers, use_gpu=plan.use_gpu,
                         resources_per_worker=plan.resources_per_worker)


def train(config: TrainConfig, log=print) -> dict[str, Any]:
    """Train on Ray; returns the content of result.json."""
    # Named, with absolute paths (workers' working directories differ), locked, and checked
    # against the run's config.json: all before Ray starts.
    config = rundir.settle(config)
    with rundir.locked(run_dir(config), "train"):
        if (finished := rundir.claim(config)) is not None:
            return rundir.already_finished(finished, log)
        return _fit(config, log)


def keep_ray_on_loopback(config: TrainConfig) -> None:
    """The embedded local Ray listens on 127.0.0.1 only, unless --expose-ray.

    Ray 2.60 has no bind-address option. Its single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    read once when `ray` is imported) gives every Ray process the loopback address as its
    node IP, and each listens there; tests/test_security.py checks every listener.
    """
    if config.address or config.expose_ray or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "ray" in sys.modules:
        return  # a cluster of several nodes, asked to, or too late (ray already imported in this process)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _fit(config: TrainConfig, log) -> dict[str, Any]:
    keep_ray_on_loopback(config)  # before `import ray`
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, WorkerGroupError
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from mnist_dist.ray_backend import TfConfig

    started = time.perf_counter()
    init_ray(config)
    import ray

    rundir.check_storage_reachable(config.storage, {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    trainer = DataParallelTrainer(
        worker_main,
        backend_config=TfConfig(),
        train_loop_config=config.to_dict(),
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path(config.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as exc:
        # A diverged run is not a crash: one line, not every worker's traceback.
        for failure in exc.worker_failures.values():
            line = next((ln for ln in str(failure).splitlines() if "training diverged:" in ln), None)
            if line:
                raise results.RunError(line[line.index("training diverged:"):]) from None
        raise
    wall_seconds = time.perf_counter() - started
    diverged = rundir.read_json(run_dir(config), DIVERGED_FILE)
    if diverged is not None:
        objectstore.delete(objectstore.join(run_dir(config), DIVERGED_FILE))
        raise results.RunError(diverged["error"])
    if not result.best_checkpoints:
        raise RuntimeError(f"the run reported no checkpoint; see the worker logs above (run directory {run_dir(config)})")
    scored = result.metrics.get("test")  # rank 0 scores the best weights on the test set when it has them
    best_checkpoint, best_metrics = pick_best(result.best_checkpoints, scored["epoch"] if scored else None)
    if scored and best_metrics["epoch"] != scored["epoch"]:
        scored = None
    history = state_history(result)
    with best_checkpoint.as_directory() as directory:
        return results.finish(config, run_dir(config), best_checkpoint.path, best_metrics, result.metrics, history,
                              wall_seconds, log, eval_dir=directory, test=scored)


def pick_best(checkpoints: list, epoch: int | None):
    """The (checkpoint, metrics) with the highest validation accuracy; `epoch` settles a tie."""
    top = max(metrics["val_accuracy"] for _, metrics in checkpoints)
    tied = [pair for pair in checkpoints if pair[1]["val_accuracy"] == top]
    return next((pair for pair in tied if pair[1]["epoch"] == epoch), min(tied, key=lambda pair: pair[1]["epoch"]))


def state_history(result) -> list[dict[str, Any]]:
    """Per-epoch metrics, read from the latest checkpoint's state (it carries the whole history)."""
    from mnist_dist.checkpoint import load_state

    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as directory:
        return load_state(directory).get("history", [])
