"""Real Ray Train runs on real MNIST: 2 workers, MultiWorkerMirroredStrategy, checkpoints."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow


def test_two_worker_run_writes_result_and_best_pointer(ray_run):
    result, run_dir = ray_run["result"], ray_run["run_dir"]
    for key in ("best_checkpoint", "best_epoch", "best_val_accuracy", "test_accuracy", "epochs_completed",
                "global_step", "workers", "global_batch_size", "config"):
        assert key in result
    assert result["workers"] == 2 and result["global_batch_size"] == 64
    assert result["epochs_completed"] == 2 and result["global_step"] == 2 * (4096 // 64)
    assert result["test_accuracy"] > 0.8
    best = json.loads((run_dir / "best.json").read_text())
    # best.json is relative to the run directory, so a copied run stays whole.
    assert run_dir / best["checkpoint"] == Path(result["best_checkpoint"]) and (run_dir / best["checkpoint"]).is_dir()
    assert best["val_accuracy"] == max(h["val_accuracy"] for h in result["history"])
    assert "test accuracy" in ray_run["stdout"] and result["best_checkpoint"] in ray_run["stdout"]


def _assert_replicas_identical(run_dir, epochs):
    checkpoints = sorted(run_dir.glob("checkpoint_epoch*"))
    assert len(checkpoints) == epochs
    for checkpoint in checkpoints:
        digests = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["weights_sha256"]
                   for p in checkpoint.glob("replica-*.json")}
        assert sorted(digests) == [0, 1]
        assert len(set(digests.values())) == 1, f"replicas diverged in {checkpoint.name}: {digests}"


def test_workers_hold_bit_identical_weights(ray_run):
    _assert_replicas_identical(ray_run["run_dir"], epochs=2)


def test_checkpoint_restores_to_the_same_validation_and_test_accuracy(ray_run):
    from mnist_dist.evaluate import evaluate_checkpoint

    result = ray_run["result"]
    _state, val = evaluate_checkpoint(result["best_checkpoint"], split="val")
    assert val["accuracy"] == pytest.approx(result["best_val_accuracy"], abs=1e-6)
    # Rank 0 scored the test set with the weights in memory; the saved checkpoint agrees.
    _state, test = evaluate_checkpoint(result["best_checkpoint"], split="test")
    assert test["accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-6)
    assert test["loss"] == pytest.approx(result["test_loss"], rel=1e-4)


def test_only_the_workers_import_tensorflow(ray_run):
    """The driver and Ray Train's controller stay TensorFlow-free: each import costs seconds of start-up."""
    records = {int(p.stem): " ".join(p.read_text().split()) for p in ray_run["import_log"].glob("*.txt")}
    workers = {int(p.read_text()) for p in ray_run["pids"].glob("rank*.pid")}
    assert len(workers) == 2, ray_run["stdout"][-3000:]
    assert set(records) == workers, f"other processes imported TensorFlow: {records}"


def test_workers_that_fill_the_machine_are_pinned_to_their_own_cores(ray_run):
    """2 one-CPU workers: pinned when this machine offers exactly 2 CPUs, else left to the OS."""
    out = ray_run["stdout"] + ray_run["stderr"]
    if len(os.sched_getaffinity(0)) == 2:
        assert out.count("worker threads pinned: each worker keeps to its own 1 CPU(s)") == 1, out[-3000:]
    else:
        assert "worker threads pinned" not in out


def test_local_ray_starts_no_preemption_watcher(ray_run):
    # With it on, Ray Train starts one more actor and logs a core_worker error naming it.
    assert "PreemptionWatcher" not in ray_run["stdout"] + ray_run["stderr"]


def test_driver_prints_rank_zero_lines_once(ray_run):
    out = ray_run["stdout"]
    assert out.count("step     20 ") == 1
    assert out.count("epoch 1/2: validation accuracy") == 1
    assert "Reporting training result" not in out  # Ray Train's per-report INFO line, metrics dict and all
    assert "Failed to query" not in out  # the state queries that fail without the dashboard stay in Ray's logs


def _start_training(storage, name, extra_env=None, epochs=3, model="lenet5", extra_args=(), cwd=None):
    args = [sys.executable, "-m", "mnist_dist.cli", "train", "--preset", "smoke", "--model", model, "--workers", "2", "--batch-size", "32",
            "--train-limit", "6144", "--val-size", "1000", "--epochs", str(epochs), "--eval-every", "50",
            "--storage", str(storage), "--name", name, "--max-failures", "1", *extra_args]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, **(extra_env or {})}, start_new_session=True)


def _wait_for_committed_checkpoint(run_dir: Path, proc, timeout=240, name="checkpoint_epoch001"):
    """Until Ray has registered the checkpoint `name` (a regular expression): a folder on disk is
    not enough, since report() is a barrier and a checkpoint counts only once every rank has reported it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while not (snapshot.exists() and re.search(name, snapshot.read_text())):
        assert proc.poll() is None, f"training ended before a checkpoint was committed:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint committed in {timeout} s"
        time.sleep(0.1)


def _wait_for_step_checkpoint_on_disk(run_dir: Path, proc, step: int, timeout=240):
    state = run_dir / f"checkpoint_step{step:08d}" / "state.json"
    deadline = time.time() + timeout
    while not state.exists():
        assert proc.poll() is None, f"training ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no step {step} checkpoint in {timeout} s"
        time.sleep(0.05)


def _assert_complete_and_continuous(run_dir, epochs=3):
    result = json.loads((run_dir / "result.json").read_text())
    steps = result["global_step"] // result["epochs_completed"]
    assert result["epochs_completed"] == epochs
    assert [h["epoch"] for h in result["history"]] == list(range(1, epochs + 1))
    assert [h["global_step"] for h in result["history"]] == [steps * e for e in range(1, epochs + 1)]


def test_rerun_after_driver_killed_resumes_instead_of_starting_over(tmp_path, small_run):
    """A laptop run killed whole (driver and its local Ray) resumes from its latest checkpoint.
    A worker group restarted from a checkpoint while the driver lives: tests/test_cluster.py."""
    # With gradients summed in bfloat16, before and after the resume; the old flag name still works.
    # (Batch-norm statistics across a restarted worker group: test_cluster.py's cnn-bn run.)
    # A step checkpoint every 10 steps: killed in epoch 2 (96 steps an epoch; 3 epochs, so that a
    # slow kill still lands mid-run), the run goes on from its last one. The kill comes as soon
    # as step 110's checkpoint is on disk (Ray's snapshot can lag by seconds on a busy machine).
    # Distilled from a finished run given by a path relative to the driver's working directory
    # (the workers have others), before and after the resume.
    shutil.copytree(small_run, tmp_path / "teacher")
    args = ("--allreduce", "bf16", "--checkpoint-every", "10", "--teacher", "teacher")
    proc = _start_training(tmp_path / "runs", "resume", extra_args=args, epochs=3, cwd=tmp_path)
    _wait_for_step_checkpoint_on_disk(tmp_path / "runs" / "resume", proc, 110)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=60)
    first = proc.stdout.read()
    time.sleep(2)
    proc = _start_training(tmp_path / "runs", "resume", extra_args=args, epochs=3, cwd=tmp_path)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    taught = f"teacher: lenet5 of {tmp_path / 'teacher' / 'checkpoint_epoch001'} (epoch 1, validation accuracy"
    assert taught in first and taught in out, (first + out)[-4000:]
    # From a step checkpoint (the last one Ray registered), or from the epoch checkpoint when the
    # kill came just after an epoch's end: either way, past step 96 and on a checkpoint's step.
    resumed = re.search(r"resumed from checkpoint_(?:step|epoch)\d+: global step (\d+), epoch (\d)( \+ (\d+) steps)?", out)
    assert resumed and int(resumed.group(1)) == 96 * int(resumed.group(2)) + int(resumed.group(4) or 0), out[-4000:]
    assert int(resumed.group(1)) > 96 and int(resumed.group(1)) % 10 in (0, 2), out[-4000:]
    assert "epoch 1/3: validation accuracy" not in out
    assert "trained before this command resumed the run" in out  # and not in its training time
    _assert_complete_and_continuous(tmp_path / "runs" / "resume", epochs=3)
    _assert_replicas_identical(tmp_path / "runs" / "resume", epochs=3)
    result = json.loads((tmp_path / "runs" / "resume" / "result.json").read_text())
    assert result["config"]["allreduce"] == "bf16" and result["config"]["teacher"] == str(tmp_path / "teacher" / "checkpoint_epoch001")
    # Two commands, each one worker group from its start: a re-run is a start, not a failure.
    assert [(r["reason"], r["workers"]) for r in result["resizes"]] == [("start", 2), ("start", 2)]
    assert result["resizes"][1]["global_step"] == int(resumed.group(1))
    assert result["lost_steps"] >= 0


def test_an_elastic_range_starts_with_the_workers_the_machine_holds(tmp_path):
    """--workers 1-4 on the embedded local Ray of a 2-core machine: 2 workers train the global batch of 4."""
    from conftest import run_cli

    cores = os.cpu_count()
    proc = run_cli("train", "--preset", "smoke", "--synthetic", "--workers", "1-4", "--batch-size", "16", "--epochs", "1",
                   "--storage", tmp_path, "--name", "elastic")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "elastic" / "result.json").read_text())
    started = min(cores, 4)
    assert result["resizes"] == [{"global_step": 0, "workers": started, "reason": "start"}]
    assert result["global_batch_size"] == 64 and result["global_step"] == 2048 // 64
    if started < 4:
        assert f"{started} worker(s) of 1-4, about {64 // started} each, = global batch 64" in proc.stdout


def test_a_run_that_diverges_on_ray_workers_stops_with_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli("train", "--preset", "smoke", "--synthetic", "--workers", "2", "--batch-size", "32", "--lr", "1e12",
                   "--storage", tmp_path, "--name", "nan")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged: the loss is nan") and "Fix: a lower --lr" in line, line
    # The workers stop; none raises, so neither they nor the controller print a traceback.
    output = proc.stdout + proc.stderr
    assert "TrainingDiverged" not in output and "WorkerGroupError" not in output, output[-3000:]
    assert not list((tmp_path / "nan").glob("checkpoint_epoch*"))
