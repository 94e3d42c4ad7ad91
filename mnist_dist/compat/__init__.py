"""Every framework internal mnist-dist still relies on, in one place, each with why.

Tested with the versions below, which pyproject.toml pins to the minor release (TensorFlow
2.21 for the import banner). `compat.ray_backend` is Ray Train's backend developer API, the
only way to give each worker its TF_CONFIG. tests/test_compat.py checks each name here
against the installed Keras, Ray and TensorFlow, so an upgrade that moves one fails there,
by name, instead of deep inside a training run.
"""
from __future__ import annotations

import os

from mnist_dist.errors import MnistDistError

KERAS_TESTED = "3.15"
RAY_TESTED = "2.60"


class CompatError(MnistDistError, RuntimeError):
    """An installed Keras or Ray that is not the version this module was written against."""


def check_version(package: str, installed: str, tested: str) -> None:
    if installed.split(".")[:2] != tested.split("."):
        raise CompatError(f"mnist-dist was tested with {package} {tested}.x, and {package} {installed} is installed; "
                          f"it relies on internals that may have moved (mnist_dist/compat/). "
                          f'Fix: pip install "{package}=={tested}.*", or reinstall mnist-dist.')


# --- Keras ---------------------------------------------------------------------------

def keras_checked():
    import keras

    check_version("keras", keras.__version__, KERAS_TESTED)
    return keras


class PresummedGradients:
    """Mixin for a Keras optimizer whose gradients arrive already summed over the replicas.

    Keras' TensorFlow optimizer all-reduces the gradients in `apply_gradients`, through
    `_all_reduce_sum_gradients`, its only hook for that (tf_keras had the public flag
    `experimental_aggregate_gradients=False`). The train step exchanges gradients itself
    (mnist_dist.gradients), in fp32 or bf16, so the optimizer must not sum them again.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


# --- TensorFlow ------------------------------------------------------------------------

# What TensorFlow 2.21 prints at import on every worker whatever TF_CPP_MIN_LOG_LEVEL says:
# absl writes it before its logging is configured, so only the file descriptor can hold it
# back (process_setup.without_import_banner). Matched by message, never by source line.
TENSORFLOW_IMPORT_BANNER = ("All log messages before absl::InitializeLog() is called are written to STDERR",
                            "oneDNN custom operations are on")
# Keras imports matplotlib.pyplot at import, for an optional image-gallery helper, whenever
# matplotlib is installed (for `mnist-dist report`); workers never plot, so they import
# TensorFlow with it hidden (process_setup.hidden_modules), as where it is missing.
WORKER_HIDDEN_MODULES = ("matplotlib",)
KERAS_MATPLOTLIB_MODULE = "keras.src.visualization.plot_image_gallery"


# --- Ray -----------------------------------------------------------------------------

def ray_checked():
    import ray

    check_version("ray", ray.__version__, RAY_TESTED)
    return ray


def data_parallel_trainer():
    """Ray Train V2's framework-neutral trainer. Its only public subclasses are per framework,
    and `ray.train.tensorflow.TensorflowTrainer` imports TensorFlow into the driver and the
    controller, and sets TF_USE_LEGACY_KERAS=1 (see mnist_dist.compat.ray_backend)."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer


def tune_epoch_reports():
    """Ray Train V2's bridge from a run to the Ray Tune trial that started it: the callback
    Ray's Train-with-Tune guide uses (ray.tune.integration.ray_train.TuneReportCallback, a
    DeveloperAPI), passing on epoch reports only. A step checkpoint's report carries
    val_accuracy -1 (mnist_dist.loop), which ASHA would take for a result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("kind") != "step":
                super().after_report(run_context, metrics, checkpoint)

    return EpochReports()


# Ray Train reads these when its controller starts; they have no public setting.
LOCAL_RAY_TRAIN_ENV = {
    # The preemption watcher is one more actor on every run, and logs an error line at
    # start-up; one local machine has nothing to preempt.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Every phase of start-up and teardown waits for the controller's next poll of its
    # workers (2 s by default); docs/benchmarks.md#start-up-bench-startup has the figures.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}
# An elastic group restarts only once Ray Train has seen room for it, so its placement group
# should be placed at once. After a preemption Ray Train still counts the drained node, which
# is alive until the cloud takes it, and waits this long (60 s by default) for a group that
# cannot be placed before it tries a smaller one (docs/spot.md).
ELASTIC_RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
def free_resources_per_node() -> dict[str, dict[str, float]]:
    """{node id: free resources} of the live nodes that are not draining, for rank 0's check
    whether another worker fits on one node (mnist_dist.spot), as Ray Train's elastic policy
    counts. Ray offers only the cluster's sum publicly; `available_resources_per_node` is a
    DeveloperAPI in ray._private.state, and the draining nodes are what Ray Train's own
    PreemptionWatcher reads (ray.train.v2._internal.execution.preemption)."""
    from ray._private import state

    draining = state.state.get_draining_nodes() or {}
    return {node: free for node, free in state.available_resources_per_node().items() if node not in draining}


def autoscaler_watches(gcs_address: str) -> bool:
    """Whether an autoscaler that can add nodes watches this cluster, read as `ray status`
    reads it (ray.scripts.scripts.status, Ray 2.60); Ray offers no public call. A v2
    autoscaler reports a state version. The v1 monitor writes its status into the GCS's
    key-value store, but every `ray start --head` runs one: without an autoscaling config it
    uses the read-only provider, which names each node's type after the node itself
    (format_readonly_node_type). Types of their own (KubeRay's group names) mean a real one."""
    import json

    from ray._private import ray_constants
    from ray._raylet import GcsClient
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.sdk import get_cluster_status

    if get_cluster_status(gcs_address).stats.autoscaler_version not in ("", "0", "None"):
        return True
    status = GcsClient(address=gcs_address).internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), None)
    if not status:
        return False
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != format_readonly_node_type(node) for node, node_type in mapping.items())


# A drain without a deadline: Ray Train tears the group down this long after it saw the drain
# (ray.train.v2._internal.constants.DEFAULT_PREEMPTION_DEADLINE_S, not public); the workers
# wait that long after their just-in-time checkpoint (mnist_dist.spot).
RAY_PREEMPTION_DEFAULT_DEADLINE_S = 120.0
RAY_PREEMPTION_POLL_S = 5.0  # its PreemptionWatcher's poll (DEFAULT_PREEMPTION_POLL_INTERVAL_S)
# Ray Train's controller takes in a worker's report at its next poll of the group, this often
# (DEFAULT_HEALTH_CHECK_INTERVAL_S, or the variable, as its controller reads it).
RAY_TRAIN_POLL_S = 2.0
RAY_TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def ray_train_poll_s() -> float:
    return float(os.environ.get(RAY_TRAIN_POLL_ENV) or RAY_TRAIN_POLL_S)


# Without the dashboard there is no State API for Ray Train's state actor to poll.
NO_DASHBOARD_ENV = {"RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0"}
# Ray 2.60 has no bind-address option. Its single-node mode, read once when `ray` is
# imported, gives every Ray process the loopback address as its node IP.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Ray Train loggers named after their source files (outside "ray.train"): the report
# logger prints every metrics dict, and without the dashboard the placement-group cleaner
# warns once a second that the State API does not answer.
REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Each worker logs the traceback of an exception that leaves the training function here,
# under this message; the driver gets the same exception in WorkerGroupError.worker_failures.
TRAIN_FN_ERROR_LOGGER = "ray.train.v2._internal.util"
TRAIN_FN_ERROR_MESSAGE = "Error in training function"
# The actor behind ray.train.report's barrier (ray.train.v2._internal.execution.checkpoint.
# sync_actor). Ray Train kills it when it tears a group down for one worker's failure, and a
# worker waiting in the barrier then fails with ActorDiedError naming it: a consequence, not a cause.
TRAIN_BARRIER_ACTOR = "SynchronizationActor"


def stopped_in_report_barrier(error: BaseException | None) -> bool:
    """Whether a worker failed only because Ray Train tore its group down while it waited in
    ray.train.report's barrier (another worker's failure, which the driver reports)."""
    import ray.exceptions

    return isinstance(error, ray.exceptions.ActorDiedError) and TRAIN_BARRIER_ACTOR in str(error)


def report_logger_name() -> str | None:
    import importlib

    try:
        return importlib.import_module(REPORT_LOGGER_MODULE).__file__
    except ImportError:
        return None


def set_default_env(values: dict[str, str]) -> None:
    for name, value in values.items():
        os.environ.setdefault(name, value)
