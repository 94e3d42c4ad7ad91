"""The framework internals in mnist_dist/compat/ still exist in the installed Keras and Ray.

Each test names the internal it checks, so an upgrade that moves one fails here, loudly,
rather than as a wrong sum or a silent slowdown in a training run.
"""
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

from mnist_dist import compat
from mnist_dist.store import StorageError


def test_the_installed_keras_and_ray_are_the_tested_minor_versions():
    import keras
    import ray

    compat.check_version("keras", keras.__version__, compat.KERAS_TESTED)
    compat.check_version("ray", ray.__version__, compat.RAY_TESTED)


def test_another_minor_version_is_one_line_that_names_the_fix():
    with pytest.raises(compat.CompatError) as caught:
        compat.check_version("keras", "3.16.0", "3.15")
    message = str(caught.value)
    assert "\n" not in message and "keras 3.16.0 is installed" in message and 'pip install "keras==3.15.*"' in message


def test_pyproject_pins_keras_and_ray_to_the_tested_minor_versions():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    major, minor = compat.KERAS_TESTED.split(".")
    assert f'"keras>={compat.KERAS_TESTED},<{major}.{int(minor) + 1}"' in pyproject
    major, minor = compat.RAY_TESTED.split(".")
    assert f'"ray[default,train]>={compat.RAY_TESTED},<{major}.{int(minor) + 1}"' in pyproject


def test_keras_still_sums_replica_gradients_through_the_hook_the_step_optimizer_overrides():
    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    assert "self._all_reduce_sum_gradients(" in inspect.getsource(TFOptimizer._backend_update_step)
    from mnist_dist.optimizers import StepAdam, StepSGD

    for step_class in (StepAdam, StepSGD):
        assert step_class._all_reduce_sum_gradients is compat.PresummedGradients._all_reduce_sum_gradients
        assert issubclass(step_class, TFOptimizer)


def test_keras_still_updates_each_variable_through_update_step():
    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    assert "self.update_step(" in inspect.getsource(TFOptimizer._distributed_tf_update_step)
    import keras

    for optimizer_class in (keras.optimizers.Adam, keras.optimizers.SGD):
        assert list(inspect.signature(optimizer_class.update_step).parameters) == ["self", "gradient", "variable", "learning_rate"]


def test_ray_train_v2_still_has_its_framework_neutral_trainer():
    from ray.train.backend import BackendConfig

    trainer = compat.data_parallel_trainer()
    assert "backend_config" in inspect.signature(trainer.__init__).parameters
    assert BackendConfig().framework is None  # mnist_dist.compat.ray_backend leaves it unset


def test_ray_trains_backend_developer_api_still_has_what_the_tf_config_backend_calls():
    from ray.train._internal.base_worker_group import BaseWorkerGroup
    from ray.train.backend import Backend

    from mnist_dist.compat.ray_backend import TfConfig, _TfConfigBackend

    assert issubclass(_TfConfigBackend, Backend) and TfConfig().backend_cls is _TfConfigBackend
    assert list(inspect.signature(Backend.on_start).parameters) == ["self", "worker_group", "backend_config"]
    for method in ("execute", "execute_single_async"):
        assert callable(getattr(BaseWorkerGroup, method)), f"Ray's worker group has no {method}"
    assert len(inspect.signature(BaseWorkerGroup.execute_single_async).parameters) >= 3  # (self, rank, fn, ...)


def test_keras_still_imports_matplotlib_only_optionally():
    """Hiding matplotlib from the workers' import relies on Keras catching its ImportError."""
    import ast

    source = Path(importlib.util.find_spec(compat.KERAS_MATPLOTLIB_MODULE).origin).read_text()
    guarded = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Try)
               and any("matplotlib" in ast.unparse(stmt) for stmt in node.body)
               and any(ast.unparse(handler.type or ast.Name("")) == "ImportError" for handler in node.handlers)]
    assert guarded, f"{compat.KERAS_MATPLOTLIB_MODULE} no longer imports matplotlib inside try/except ImportError"


@pytest.mark.parametrize("name", [*compat.LOCAL_RAY_TRAIN_ENV, *compat.NO_DASHBOARD_ENV, *compat.LOOPBACK_ENV,
                                  *compat.ELASTIC_RAY_TRAIN_ENV])
def test_ray_still_reads_each_environment_setting(name):
    import ray

    root = Path(ray.__file__).parent
    constants = [root / "train" / "v2" / "_internal" / "constants.py", root / "_private" / "ray_constants.py"]
    assert any(f'"{name}"' in path.read_text() for path in constants), f"Ray {ray.__version__} no longer reads {name}"


def test_the_loggers_quieted_by_name_still_exist():
    assert compat.report_logger_name() is not None
    module = importlib.import_module(compat.PLACEMENT_GROUP_CLEANER_LOGGER)
    assert "logger" in vars(module)


def test_ray_train_still_logs_a_training_functions_traceback_where_the_worker_filters_storage_faults():
    import inspect

    module = importlib.import_module(compat.TRAIN_FN_ERROR_LOGGER)
    assert module.logger.name == compat.TRAIN_FN_ERROR_LOGGER
    assert f'logger.error(f"{compat.TRAIN_FN_ERROR_MESSAGE}:' in inspect.getsource(module.construct_user_exception_with_traceback)


def test_the_worker_filter_drops_only_the_traceback_of_its_runs_storage_fault(tmp_path):
    import logging

    from mnist_dist import process_setup
    from mnist_dist.store import Location

    run = Location.of(tmp_path / "runs" / "r")
    keep = process_setup.StorageFaultFilter(run).filter

    def filtered(error, message=f"{compat.TRAIN_FN_ERROR_MESSAGE}:\nTraceback ..."):
        record = logging.LogRecord(compat.TRAIN_FN_ERROR_LOGGER, logging.ERROR, __file__, 1, message, None, None)
        try:
            raise error
        except Exception:  # Ray's logger logs it while the exception is handled
            return not keep(record)

    assert filtered(OSError(30, "Read-only file system", str(run / "checkpoint_epoch002")))
    assert filtered(OSError(f"[Errno 30] Cannot create directory '{run}/checkpoint_epoch002'"))  # pyarrow's
    assert filtered(StorageError(f"{run}/progress.json: writing failed (No space left on device)", "No space"))
    assert not filtered(OSError(13, "Permission denied", "/home/me/.cache/mnist-dist/mnist"))  # not the run's
    assert not filtered(ValueError("a bug")) and not filtered(KeyError("another"))
    assert not filtered(OSError(30, "Read-only file system", str(run / "x")), message="another error")

    # Another worker, waiting in ray.train.report's barrier when Ray Train tore the group down
    # for that fault; the barrier actor's death for any other reason is not a storage fault's.
    from ray.exceptions import ActorDiedError

    torn_down = ActorDiedError()
    torn_down.error_msg = f"The actor died unexpectedly before finishing this task.\n\tclass_name: {compat.TRAIN_BARRIER_ACTOR}"
    assert "SynchronizationActor" in str(torn_down) and filtered(torn_down)
    other = ActorDiedError()
    other.error_msg = "The actor died unexpectedly before finishing this task.\n\tclass_name: SomeoneElsesActor"
    assert not filtered(other)


def test_ray_trains_report_barrier_is_the_actor_the_worker_filter_names():
    from ray.train.v2._internal.execution.checkpoint import sync_actor

    assert sync_actor.SynchronizationActor.__ray_actor_class__.__name__ == compat.TRAIN_BARRIER_ACTOR


def test_ray_trains_default_preemption_deadline_is_the_one_the_workers_wait_for():
    from ray.train.v2._internal import constants

    assert constants.DEFAULT_PREEMPTION_DEADLINE_S == compat.RAY_PREEMPTION_DEFAULT_DEADLINE_S
    assert constants.DEFAULT_PREEMPTION_POLL_INTERVAL_S == compat.RAY_PREEMPTION_POLL_S
    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S == compat.RAY_TRAIN_POLL_S
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == compat.RAY_TRAIN_POLL_ENV


def test_each_workers_port_stays_its_own_until_tensorflow_takes_it():
    """Two workers of a node asked at once never get the same port: each holds its own until release_port."""
    import socket

    from mnist_dist.compat import ray_backend

    first, second = ray_backend._free_address(), ray_backend._free_address()
    assert first.rsplit(":", 1)[1] != second.rsplit(":", 1)[1]
    port = int(first.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.socket() as taken:
        taken.bind(("", port))  # still held
    ray_backend.release_port()
    with socket.socket() as free:
        free.bind(("", port))


def test_ray_still_has_the_per_node_free_resources_and_draining_nodes_that_growth_reads():
    from ray._private import state

    assert callable(state.available_resources_per_node) and callable(state.state.get_draining_nodes)
    source = Path(__import__("ray.train.v2._internal.execution.preemption", fromlist=["x"]).__file__).read_text()
    assert "get_draining_nodes()" in source  # what Ray Train's own watcher reads


def test_ray_still_tells_whether_an_autoscaler_watches_the_cluster_as_ray_status_reads_it():
    """compat.autoscaler_watches reads what `ray status` reads: the v1 monitor's status key
    in the GCS's key-value store, and the v2 autoscaler's state version."""
    import inspect

    from ray._private import ray_constants
    from ray._raylet import InnerGcsClient
    from ray.autoscaler.v2.schema import Stats
    from ray.autoscaler.v2.sdk import get_cluster_status

    assert ray_constants.DEBUG_AUTOSCALING_STATUS == "__autoscaling_status"
    assert callable(InnerGcsClient.internal_kv_get) and callable(get_cluster_status)  # GcsClient forwards to it
    assert "autoscaler_version" in {f.name for f in __import__("dataclasses").fields(Stats)}
    status = inspect.getsource(__import__("ray.scripts.scripts", fromlist=["x"]).status.callback)
    assert "DEBUG_AUTOSCALING_STATUS" in status
    monitor = Path(__import__("ray.autoscaler._private.monitor", fromlist=["x"]).__file__).read_text()
    assert "DEBUG_AUTOSCALING_STATUS" in monitor  # the v1 monitor still writes it
    # ... and names the read-only provider's node types after the nodes (the "no autoscaler" case).
    from ray.autoscaler._private.util import format_readonly_node_type

    assert "format_readonly_node_type" in monitor and format_readonly_node_type("abc") == "node_abc"
    from ray.autoscaler._private.autoscaler import AutoscalerSummary

    assert "node_type_mapping" in {f.name for f in __import__("dataclasses").fields(AutoscalerSummary)}


def test_ray_trains_bridge_to_tune_is_the_callback_the_sweeps_trials_pass_epoch_reports_through():
    """compat.tune_epoch_reports subclasses Ray's TuneReportCallback (a DeveloperAPI) and
    overrides after_report; a Ray that renames either fails here, by name."""
    import inspect

    from ray.tune.integration.ray_train import TuneReportCallback

    assert list(inspect.signature(TuneReportCallback.after_report).parameters) == ["self", "run_context", "metrics", "checkpoint"]
    with pytest.raises(RuntimeError, match="must be used in a Tune session"):  # outside a trial, as Ray says
        compat.tune_epoch_reports()
