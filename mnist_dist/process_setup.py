"""Per-process set-up: thread pools from the CPU allotment, GPU visibility, the strategy.

Pure-logic helpers (`thread_env`, `device_plan`) are separate from the functions that
touch TensorFlow, so the GPU branch can be unit-tested on a CPU-only machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from mnist_dist import compat


def thread_env(cpus: int) -> dict[str, str]:
    """Environment that keeps every native thread pool inside the worker's CPU allotment.

    Two workers with TensorFlow's default pools (one thread per core each) fight over
    the cores and train several times slower than one process; OpenMP/oneDNN pools do the
    same. The inter-op pool is as wide as the allotment: a single inter-op thread was
    slower (docs/benchmarks.md#measured-design-choices).
    """
    cpus = max(1, int(cpus))
    return {
        "OMP_NUM_THREADS": str(cpus),
        "TF_NUM_INTRAOP_THREADS": str(cpus),
        "TF_NUM_INTEROP_THREADS": str(cpus),
        "MKL_NUM_THREADS": str(cpus),
    }


@dataclass(frozen=True)
class DevicePlan:
    use_gpu: bool
    resources_per_worker: dict[str, float]
    collective: str  # "NCCL" or "RING"


def device_plan(cpus_per_worker: int, gpus_per_worker: float) -> DevicePlan:
    """What each Ray worker asks for, and which all-reduce fits its device.

    NCCL only when every worker has a GPU of its own: NCCL refuses two ranks on one device,
    so workers that share a GPU (Ray's fractional GPUs, --gpus-per-worker 0.5) use RING.
    """
    resources: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker:
        resources["GPU"] = float(gpus_per_worker)
    return DevicePlan(use_gpu=gpus_per_worker > 0, resources_per_worker=resources,
                      collective="NCCL" if gpus_per_worker >= 1 else "RING")


def cores_to_pin(local_rank: int, local_world_size: int, cpus_per_worker: int, allowed: set[int]) -> set[int] | None:
    """The CPUs that worker `local_rank` keeps its threads on, or None to leave them to the OS.

    Only when the run's workers on this node ask Ray for exactly the CPUs the process may
    use: then Ray schedules no other CPU work there, and each worker gets its own block.
    Workers whose threads the OS moved between the cores trained slower than pinned ones
    (docs/benchmarks.md#measured-design-choices). In a container whose CPU quota is smaller
    than the host's core list, the counts differ and nothing is pinned.
    """
    if local_world_size * cpus_per_worker != len(allowed):
        return None
    cores = sorted(allowed)
    return set(cores[local_rank * cpus_per_worker:(local_rank + 1) * cpus_per_worker])


def pin_threads(cores: set[int]) -> None:
    """Keep every thread of this process (and the threads it starts later) on `cores`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that has exited since the listing
            pass


@contextlib.contextmanager
def hidden_modules(*names: str) -> Iterator[None]:
    """Inside: importing these (not yet imported) packages raises ImportError. After: they import normally.

    Python's import system raises ImportError for a name whose sys.modules entry is None.
    Workers import TensorFlow with compat.WORKER_HIDDEN_MODULES hidden, which shortens the
    import (docs/benchmarks.md).
    """
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name) is None:
                del sys.modules[name]


@contextlib.contextmanager
def without_import_banner() -> Iterator[None]:
    """Holds back TensorFlow's import banner (two lines on every worker), and only that:
    a thread passes every other line written to stderr meanwhile straight on, so an import
    that fails still shows why."""
    import threading

    sys.stderr.flush()
    read_end, write_end = os.pipe()
    stderr = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pass_on():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(banner in line.decode(errors="replace") for banner in compat.TENSORFLOW_IMPORT_BANNER):
                    os.write(stderr, line)

    passer = threading.Thread(target=pass_on, daemon=True)
    passer.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)  # the pipe's last write end closes: the thread reads to the end
        passer.join(timeout=10)
        os.close(stderr)


def import_tensorflow():
    """TensorFlow, imported without its C++ banner and INFO lines, in any process (the
    driver's export and report too); TF_CPP_MIN_LOG_LEVEL set by the user still wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with without_import_banner():
        import tensorflow as tf
    return tf


def configure_process(cpus: int, use_gpu: bool) -> None:
    """Call before TensorFlow runs its first op."""
    os.environ.update(thread_env(cpus))
    # Ray's own TF backend sets this for tf_keras (ours does not); this project is Keras 3.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with hidden_modules(*compat.WORKER_HIDDEN_MODULES), without_import_banner():
        import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    except RuntimeError:  # TensorFlow already ran in this process (a notebook, a test): its pools stay
        pass
    if use_gpu:
        # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPUs, so TF sees only its own.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)


def cluster_size() -> int:
    """Number of workers named by TF_CONFIG (1 when absent)."""
    spec = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    return len(spec.get("cluster", {}).get("worker", [])) or 1


def make_strategy(plan: DevicePlan):
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else the default."""
    import tensorflow as tf

    if cluster_size() <= 1:
        return tf.distribute.get_strategy()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=getattr(tf.distribute.experimental.CommunicationImplementation, plan.collective))
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def gpu_line(plan: DevicePlan, workers: int) -> str:
    """What a GPU worker sees, for the log (scripts/gpu-check.sh reads it)."""
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    return (f"GPU worker: TensorFlow sees {len(devices)} GPU(s) ({', '.join(devices) or 'none'}); "
            f"collective {plan.collective if workers > 1 else 'none (one worker)'}")


def console(message: str) -> None:
    """Print past Ray Train's print patch, which would echo each line twice once
    TensorFlow's absl handler sits on the root logger; Ray still forwards stdout."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def rank_console(rank: int):
    """A worker's console: each line names the rank that wrote it, which Ray's own prefix,
    `(RayTrainWorker pid=...)`, does not."""
    return lambda message: console("\n".join(f"[rank {rank}] {line}" for line in message.split("\n")))


def quiet_worker_logs(run) -> None:
    """Keep the driver's console to the progress lines of rank 0. `run`: the run's Location."""
    import logging

    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    for name in ("ray.train", "ray.tune", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train logs each report, the whole metrics dict, at INFO: two long lines per worker an epoch.
    if (name := compat.report_logger_name()) is not None:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(compat.TRAIN_FN_ERROR_LOGGER).addFilter(StorageFaultFilter(run))


class StorageFaultFilter:
    """A logging filter for Ray Train's worker logger: the traceback of a training function
    stopped because the run's storage failed is left out, since the driver says it in one
    line (rundir.storage_failed), and so is another worker's, stopped in ray.train.report's
    barrier when Ray Train tore the group down for that failure; any other error's traceback
    stays. Ray logs it while handling the exception, so the exception is sys.exc_info()'s."""

    def __init__(self, run):
        self.run = run

    def filter(self, record) -> bool:
        error = sys.exc_info()[1]
        return not (record.getMessage().startswith(compat.TRAIN_FN_ERROR_MESSAGE)
                    and (self.run.failed_in(error) or compat.stopped_in_report_barrier(error)))
