"""The GPU and thread-pool branches, tested as logic on a CPU-only machine."""
import json
import os

import pytest

from mnist_dist import compat, machine, process_setup


def test_cpu_workers_ask_for_cpus_and_use_the_ring_all_reduce():
    plan = process_setup.device_plan(cpus_per_worker=2, gpus_per_worker=0)
    assert plan == process_setup.DevicePlan(use_gpu=False, resources_per_worker={"CPU": 2.0}, collective="RING")


def test_gpu_workers_ask_for_gpus_and_use_nccl():
    plan = process_setup.device_plan(cpus_per_worker=4, gpus_per_worker=1)
    assert plan.use_gpu and plan.collective == "NCCL"
    assert plan.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}


def test_thread_pools_follow_the_cpu_allotment():
    env = process_setup.thread_env(3)
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["TF_NUM_INTEROP_THREADS"] == "3"
    assert process_setup.thread_env(0)["OMP_NUM_THREADS"] == "1"


def test_cluster_size_comes_from_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert process_setup.cluster_size() == 1
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2", "c:3"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert process_setup.cluster_size() == 3


def test_launcher_asks_ray_for_the_planned_resources():
    """What `train --workers 4 --cpus-per-worker 2 --gpus-per-worker 1` hands to Ray, without a GPU."""
    from mnist_dist.config import TrainConfig
    from mnist_dist.launcher import scaling_config

    gpu = scaling_config(TrainConfig(workers=4, cpus_per_worker=2, gpus_per_worker=1))
    assert gpu.num_workers == 4 and gpu.use_gpu
    assert gpu.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    cpu = scaling_config(TrainConfig(workers=2, cpus_per_worker=1))
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.0}


def test_bf16_on_a_cpu_without_bf16_arithmetic_gets_a_warning_that_names_the_fix():
    warning = machine.slow_bf16_warning({"avx2", "fma"})
    assert warning and "--precision fp32" in warning and "AMX" in warning
    assert machine.slow_bf16_warning({"avx2", "avx512f", "avx512_bf16"}) is None
    assert machine.slow_bf16_warning({"avx2", "amx_bf16", "amx_int8"}) is None
    assert machine.slow_bf16_warning(set()) is None  # no x86 flags (ARM): not judged


def test_gradient_allreduce_dtype_follows_precision_on_cpus_only():
    from mnist_dist.config import ConfigError, TrainConfig

    assert TrainConfig().allreduce_dtype == "fp32"
    assert TrainConfig(precision="bf16").allreduce_dtype == "bf16"
    assert TrainConfig(precision="bf16", gpus_per_worker=1).allreduce_dtype == "fp32"  # NCCL sums in fp32
    assert TrainConfig(allreduce="bf16").validate().allreduce_dtype == "bf16"
    assert TrainConfig(precision="bf16", allreduce="fp32").allreduce_dtype == "fp32"
    with pytest.raises(ConfigError, match="unknown --exchange-dtype 'fp8'"):
        TrainConfig(allreduce="fp8").validate()
    with pytest.raises(ConfigError, match="Fix: drop --exchange-dtype or pass --exchange-dtype fp32"):
        TrainConfig(allreduce="bf16", gpus_per_worker=1).validate()


def test_cpu_workers_that_fill_the_node_each_get_their_own_cores():
    # 2 one-CPU workers on a 2-core machine: one core each.
    assert process_setup.cores_to_pin(0, 2, 1, {0, 1}) == {0} and process_setup.cores_to_pin(1, 2, 1, {0, 1}) == {1}
    # 2 two-CPU workers on the CPUs 4-7 this process may use: blocks of the allowed list.
    assert process_setup.cores_to_pin(1, 2, 2, {4, 5, 6, 7}) == {6, 7}
    # Workers that leave CPUs free share the node with other Ray work: no pinning.
    assert process_setup.cores_to_pin(0, 1, 1, {0, 1}) is None
    # A container whose quota (2 workers x 1 CPU) is below the host's 64 listed cores: no pinning.
    assert process_setup.cores_to_pin(0, 2, 1, set(range(64))) is None


def test_pinning_is_skipped_for_gpu_workers_and_on_request():
    from mnist_dist.config import TrainConfig
    from mnist_dist.launcher import pin_worker

    class Session:
        local_rank, local_world_size = 0, 2

    assert pin_worker(TrainConfig(pin_cpus=False), Session()) is None
    assert pin_worker(TrainConfig(gpus_per_worker=1), Session()) is None


def test_the_embedded_local_ray_starts_without_the_dashboard_unless_asked(monkeypatch):
    import os

    from mnist_dist.cli import build_parser, config_from_args
    from mnist_dist.launcher import local_ray_options

    reconcile = "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION"
    # A copy, so the variable the launcher sets does not leak into later tests' Ray runs.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != reconcile})
    plain = config_from_args(build_parser().parse_args(["train"]))
    assert plain.dashboard is False and plain.pin_cpus is True
    assert local_ray_options(plain)["include_dashboard"] is False
    assert os.environ[reconcile] == "0"  # no State API to reconcile against

    del os.environ[reconcile]
    asked = config_from_args(build_parser().parse_args(["train", "--dashboard", "--no-pin-cpus"]))
    assert asked.dashboard is True and asked.pin_cpus is False
    assert local_ray_options(asked)["include_dashboard"] is True
    assert reconcile not in os.environ


def test_hidden_modules_raise_inside_and_import_normally_after():
    import sys

    name = "mnist_dist_hidden_probe_module"
    with process_setup.hidden_modules(name, "json"):  # json is already imported: left alone
        with pytest.raises(ImportError):
            __import__(name)
        assert sys.modules["json"] is json
    assert name not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="No module named"):  # the normal error again
        __import__(name)


def test_tensorflow_import_banner_is_held_back_and_nothing_else():
    import subprocess
    import sys

    code = ("import os; from mnist_dist import compat, process_setup\n"
            "with process_setup.without_import_banner():\n"
            "    os.write(2, b'a real warning\\n')\n"
            "process_setup.configure_process(1, use_gpu=False)\n"
            "import tensorflow as tf; print(tf.constant(2).numpy())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr
    assert "a real warning" in proc.stderr
    for banner in compat.TENSORFLOW_IMPORT_BANNER:
        assert banner not in proc.stderr
    # Without the filter the same import prints them, so the check above can fail.
    bare = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert compat.TENSORFLOW_IMPORT_BANNER[1] in bare.stderr
