"""Run the training loop on N Ray Train workers (MultiWorkerMirroredStrategy, TF_CONFIG from mnist_dist.compat.ray_backend).

The driver starts an embedded local Ray unless given an address (or run inside a Ray
job), keeps the top-k checkpoints by validation accuracy with Ray's CheckpointConfig,
and leaves best.json and result.json in the run directory (see mnist_dist.results).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from pathlib import Path
from typing import Any

from mnist_dist import capacity, compat, placement, results, rundir, spot
from mnist_dist.config import TrainConfig
from mnist_dist.errors import RunError
from mnist_dist.progress import Clock
from mnist_dist.rundir import run_dir
from mnist_dist.sessions import RaySession
from mnist_dist.store import Location, basename

# Test hook: when set, each worker writes `rank<R>.pid` and `rank<R>.node` (its Ray node ID) there,
# so a test can kill a real worker, or its whole node, and see where each rank ran.
PID_DIR_ENV = "MNIST_DIST_PID_DIR"


DIVERGED_FILE = "diverged.json"  # rank 0 tells the driver that the loss stopped being a number


def worker_env() -> dict[str, str]:
    """The driver's settings each worker needs, handed over in the train loop's config: a Ray
    job's driver may not set a runtime_env of its own (the job's applies), and this works alike
    on the embedded Ray, a cluster and in a job. Not MNIST_DATA_DIR: the driver settles that
    into the config as an absolute path (data.settle_dir)."""
    passed = {k: v for k, v in os.environ.items() if k in ("MNIST_DIST_CACHE", PID_DIR_ENV, spot.STEP_FLOOR_ENV)}
    return {**passed, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}


def worker_main(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    os.environ.update(loop_config["env"])  # before TensorFlow is imported
    from mnist_dist import process_setup

    config = TrainConfig.from_dict(loop_config["config"])
    clock = Clock(loop_config["started"])
    if not config.synthetic:
        from mnist_dist.data import dir_on_this_node
        config = config.replace(data_dir=str(dir_on_this_node(config.data_dir)))
    plan = process_setup.device_plan(config.cpus_per_worker, config.gpus_per_worker)
    session = RaySession(run_dir(config), loop_config["command"], plan.resources_per_worker)
    log = process_setup.rank_console(session.rank)
    if session.rank == 0:
        log(clock.line(f"{session.world_size} worker(s) started; importing TensorFlow ..."))
    pinned = pin_worker(config, session)  # before TensorFlow starts its thread pools
    process_setup.configure_process(config.cpus_per_worker, use_gpu=config.gpus_per_worker > 0)
    if os.environ.get(PID_DIR_ENV):
        import ray

        Path(os.environ[PID_DIR_ENV], f"rank{session.rank}.pid").write_text(str(os.getpid()))
        Path(os.environ[PID_DIR_ENV], f"rank{session.rank}.node").write_text(ray.get_runtime_context().get_node_id())
    process_setup.quiet_worker_logs(run_dir(config))
    if pinned and session.rank == 0:
        log(f"worker threads pinned: each worker keeps to its own {config.cpus_per_worker} CPU(s) of this node "
                        f"(rank 0: CPU {', '.join(map(str, sorted(pinned)))}; --no-pin-cpus to turn off)")
    if plan.use_gpu and session.rank == 0:
        log(process_setup.gpu_line(plan, process_setup.cluster_size()))
    from mnist_dist.compat import ray_backend

    ray_backend.release_port()  # held since the backend chose it, so no other worker on the node got it too
    if session.rank == 0:
        log(clock.line("joining the workers into one MultiWorkerMirroredStrategy ..."))
    strategy = process_setup.make_strategy(plan)
    from mnist_dist.loop import Trainer, TrainingDiverged

    trainer = Trainer(config, session, strategy=strategy, log=log, clock=clock)
    try:
        trainer.run()
    except TrainingDiverged as exc:
        # Every rank checks the same all-reduced loss, so all stop at this step together and
        # return: the driver prints rank 0's one line, and Ray Train's controller logs no
        # worker tracebacks. (Ray Train hands the driver only metrics that came with a checkpoint.)
        if session.rank == 0:
            (run_dir(config) / DIVERGED_FILE).write_json({"error": str(exc)})


def pin_worker(config: TrainConfig, session: RaySession) -> set[int] | None:
    """Pin this CPU worker's threads when the run's workers fill the node (process_setup.cores_to_pin)."""
    from mnist_dist import process_setup

    if not config.pin_cpus or config.gpus_per_worker or not hasattr(os, "sched_setaffinity"):
        return None
    cores = process_setup.cores_to_pin(session.local_rank, session.local_world_size, config.cpus_per_worker,
                                 os.sched_getaffinity(0))
    if cores:
        process_setup.pin_threads(cores)
    return cores


def ray_address(config: TrainConfig) -> str | None:
    """The cluster to join (--address, else RAY_ADDRESS), or None for an embedded local Ray."""
    return config.address or os.environ.get("RAY_ADDRESS")


def init_ray(config: TrainConfig, log=lambda _line: None, clock: Clock | None = None) -> None:
    """Starts the embedded local Ray, or connects to the cluster; says when it is up."""
    import ray

    if ray.is_initialized():
        return
    if not sys.stdout.isatty():  # a file, a pipe, `kubectl logs`: Ray's documented switch for plain prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = ray_address(config)
    if address:  # a cluster: `auto`, `ray://host:10001`, or the one a Ray job runs in (Ray sets RAY_ADDRESS there)
        context = ray.init(address=address, log_to_driver=True)
    else:
        # Propagated from the driver to Ray Train's controller; see compat.LOCAL_RAY_TRAIN_ENV.
        compat.set_default_env(compat.LOCAL_RAY_TRAIN_ENV)
        runtime_env = {} if config.dashboard else {"worker_process_setup_hook": f"{__name__}.quiet_placement_group_cleaner"}
        # address="local": always a Ray of its own. Without it, ray.init() joins any cluster a
        # `ray start` left running on this machine (and then refuses num_cpus).
        context = ray.init(address="local", **local_ray_options(config), runtime_env=runtime_env, log_to_driver=True,
                           logging_level="WARNING")
    dashboard = getattr(context, "dashboard_url", None)
    log((clock or Clock()).line("Ray is up" + (f"; its dashboard: http://{dashboard}" if dashboard else "")))


def stop_ray() -> None:
    """Stops the embedded local Ray, or disconnects from a cluster, once the run is over.

    Left to interpreter exit, Ray first waits so that workers' log lines can finish
    printing, which they long have once the run's results are printed. What follows in the
    same process (the pipeline's export) also gets the CPUs the Ray processes held.
    """
    import ray

    # Not from inside an actor (a sweep's trial): that Ray is the one the actor runs in.
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is None:
        ray.shutdown()


def quiet_placement_group_cleaner() -> None:
    """Ray worker-process setup hook of the dashboard-less local Ray (see local_ray_options).

    Ray Train's placement-group cleaner asks the State API, which the dashboard serves,
    whether the controller is alive once a second, and logs each failed query as a warning
    that Ray forwards to the driver's console. Its own failures stay visible (ERROR).
    """
    import logging

    from mnist_dist import compat

    logging.getLogger(compat.PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def local_ray_options(config: TrainConfig) -> dict[str, Any]:
    """`ray.init` arguments of the embedded local Ray (no address)."""
    if not config.dashboard:
        # Its placement-group cleaner cannot check on the controller either (its warnings are
        # quieted by `quiet_placement_group_cleaner`); on one machine the driver's Ray
        # shutdown removes the placement group anyway.
        compat.set_default_env(compat.NO_DASHBOARD_ENV)
    # The dashboard is about ten more processes, and it answers that cleaner's State API
    # query every second while a run trains (docs/benchmarks.md#start-up-bench-startup).
    return {"num_cpus": local_cpus(config), "include_dashboard": config.dashboard}


def local_cpus(config: TrainConfig) -> int:
    """The embedded local Ray's CPUs: this machine's, or more when the workers ask for more.
    An elastic range starts as many workers as this machine's cores hold, at least MIN."""
    wanted = config.min_workers if config.elastic else config.workers
    return max(os.cpu_count() or 1, wanted * config.cpus_per_worker)


def scaling_config(config: TrainConfig):
    """What each of the N workers asks Ray for (CPUs, and GPUs when --gpus-per-worker > 0);
    an elastic range is Ray's (MIN, MAX), checked for growth every --resize-interval seconds."""
    from ray.train import ScalingConfig

    from mnist_dist import process_setup

    plan = process_setup.device_plan(config.cpus_per_worker, config.gpus_per_worker)
    if config.elastic:
        return ScalingConfig(num_workers=(config.min_workers, config.workers), use_gpu=plan.use_gpu,
                             resources_per_worker=plan.resources_per_worker,
                             elastic_resize_monitor_interval_s=config.resize_interval)
    return ScalingConfig(num_workers=config.workers, use_gpu=plan.use_gpu,
                         resources_per_worker=plan.resources_per_worker)


def keep_ray_on_loopback(config: TrainConfig) -> None:
    """The embedded local Ray listens on 127.0.0.1 only, unless --expose-ray, and checks
    Ray's auth token either way. Both settings are read when `ray` is imported.

    Token authentication is what Ray 2.60 turns on by default for a new local Ray; asked
    for explicitly (RAY_AUTH_MODE, Ray's documented setting), Ray leaves out its start-up
    warning that one may opt out. A user's own RAY_AUTH_MODE wins. See compat.LOOPBACK_ENV;
    tests/test_security.py checks every listener.
    """
    if ray_address(config) or "ray" in sys.modules:
        return  # a cluster (a Ray job's driver too: Ray sets RAY_ADDRESS), or too late (ray already imported)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not config.expose_ray:
        compat.set_default_env(compat.LOOPBACK_ENV)


def fit(config: TrainConfig, log=print, clock: Clock | None = None, callbacks: tuple = ()) -> dict[str, Any]:
    """Train a settled, locked and claimed run (mnist_dist.training) on Ray; returns the content of
    result.json. `callbacks`: Ray Train callbacks of the caller's (a sweep's trial reports to Tune)."""
    clock = clock or Clock()
    # The run's first line, before `import ray`, which alone takes a second or two.
    address = ray_address(config)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        log(clock.line("using the Ray this process has already started or joined ..."))
    else:
        log(clock.line(f"connecting to the Ray cluster at {address} ..." if address
                       else f"starting a local Ray with {local_cpus(config)} CPUs ..."))
    keep_ray_on_loopback(config)  # before `import ray`
    compat.ray_checked()
    # The workers import Keras, not the driver: a wrong Keras is one line here rather than
    # a failed worker group, retried --max-failures times.
    compat.check_version("keras", importlib.metadata.version("keras"), compat.KERAS_TESTED)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from mnist_dist.compat.ray_backend import TfConfig

    DataParallelTrainer = compat.data_parallel_trainer()

    started = time.perf_counter()
    if config.elastic:  # propagated from the driver to Ray Train's controller
        compat.set_default_env(compat.ELASTIC_RAY_TRAIN_ENV)
    init_ray(config, log, clock)
    import ray

    run = run_dir(config)
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    Location.of(config.storage).check_shared(hosts)
    if config.teacher is not None:  # every worker loads it
        Location.of(config.teacher).check_shared(hosts, flag="--teacher")
    if ray_address(config):
        check_cluster_can_hold(config, log, clock)
    trainer = DataParallelTrainer(
        worker_main,
        backend_config=TfConfig(),
        train_loop_config={"config": config.to_dict(), "env": worker_env(), "command": spot.new_command_id(),
                           "started": clock.started},
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=config.name,
            storage_path=config.storage,  # settled: an absolute path or a URI, as Ray wants
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
            # A preemption (a drained node) is not a failure: it is retried without limit
            # and leaves --max-failures to real errors.
            failure_config=FailureConfig(max_failures=config.max_failures, max_preemption_failures=-1),
            # Ray Train's INFO lines (resources requested, worker group started) are not the
            # user's business on a healthy run; its warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )
    from mnist_dist import process_setup

    per_worker = process_setup.device_plan(config.cpus_per_worker, config.gpus_per_worker).resources_per_worker
    wanted = config.min_workers if config.elastic else config.workers
    log(clock.line(f"asking Ray for {wanted}{' or more' if config.elastic else ''} worker(s) x {placement.describe(per_worker)} ..."))
    with placement.PlacementWatch(wanted, per_worker, log, clock):
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            # A worker's write (its checkpoint's upload), or the controller's (its checkpoint snapshot).
            failures = [*getattr(exc, "worker_failures", {}).values(), getattr(exc, "controller_failure", None)]
            fault = next((e for e in failures if run.failed_in(e)), None)
            if fault is None:
                raise
            raise rundir.storage_failed(run, fault) from None
    wall_seconds = time.perf_counter() - started
    diverged = rundir.read_json(run, DIVERGED_FILE)
    if diverged is not None:  # every rank stopped at the same step and returned (worker_main)
        (run / DIVERGED_FILE).delete()
        raise RunError(diverged["error"])
    if not any(metrics.get("kind") != "step" for _, metrics in result.best_checkpoints or []):
        raise RuntimeError(f"the run reported no checkpoint; see the worker logs above (run directory {run})")
    scored = result.metrics.get("test")  # rank 0 scores the best weights on the test set when it has them
    best_checkpoint, best_metrics = pick_best(result.best_checkpoints)
    if scored and best_metrics["epoch"] != scored["epoch"]:
        scored = None
    history = state_history(result)
    with best_checkpoint.as_directory() as directory:
        return results.finish(config, run, basename(best_checkpoint.path), Path(directory), best_metrics, result.metrics,
                              history, wall_seconds, log, test=scored)


# Nodes that are still joining a cluster without an autoscaler get this long to show up
# (seconds; MNIST_DIST_JOIN_WAIT_S sets it, for nodes that take longer, or a test that waits less).
JOIN_WAIT_ENV = "MNIST_DIST_JOIN_WAIT_S"


def join_wait_seconds() -> float:
    text = os.environ.get(JOIN_WAIT_ENV) or "30"
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise RunError(f"{JOIN_WAIT_ENV}={text!r} is not a number of seconds. Fix: set it to the seconds nodes get "
                       "to join (30 by default), or unset it")
    return seconds


def check_cluster_can_hold(config: TrainConfig, log=lambda _line: None, clock: Clock | None = None) -> None:
    """On a cluster with no autoscaler, fail in under a minute, in one line, when its nodes can
    never place the MIN workers asked for, instead of Ray Train waiting for them until a
    deadline (mnist_dist.capacity)."""
    import ray

    wait = join_wait_seconds()
    deadline = time.monotonic() + wait
    said = False
    while True:
        totals = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        problem = capacity.shortfall(totals, config.min_workers or config.workers, config.cpus_per_worker,
                                     config.gpus_per_worker)
        if problem is None or autoscaler_may_watch():
            return
        if time.monotonic() > deadline:
            raise RunError(problem)
        if not said:
            log((clock or Clock()).line(f"the cluster's nodes cannot hold the workers yet; waiting up to "
                                        f"{wait:g} s for more nodes to join ({problem.split('. Fix')[0]})"))
            said = True
        time.sleep(2.0)


def autoscaler_may_watch() -> bool:
    """compat.autoscaler_watches, or True when it cannot tell (a Ray Client connection, say):
    then Ray Train waits, as it would without this check."""
    import ray

    try:
        return compat.autoscaler_watches(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - an unanswered question must not fail a run
        return True


def pick_best(checkpoints: list):
    """The (checkpoint, metrics) of Ray's kept checkpoints whose epoch `results.best_epoch`
    picks: the rule rank 0 used when it scored the best weights."""
    epochs = [pair for pair in checkpoints if pair[1].get("kind") != "step"]
    epoch = results.best_epoch([metrics for _, metrics in epochs])
    return next(pair for pair in epochs if pair[1]["epoch"] == epoch)


def state_history(result) -> list[dict[str, Any]]:
    """Per-epoch metrics, read from the latest checkpoint's state (it carries the whole history)."""
    from mnist_dist.checkpoint import load_state

    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as directory:
        return load_state(directory).get("history", [])
