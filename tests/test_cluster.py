"""A real multi-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`): a
head that runs no training, two worker nodes, `ray job submit`, and a whole node killed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    from test_jobs import free_port

    # As a user would: with the project's environment active, so `python` in the job is that one.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    dashboard = free_port()
    # The head has no CPU: every training worker must run on a worker node.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "dashboard_agent_listen_port": free_port()})  # not the default 52365, which another Ray may hold
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        yield cluster, workers, f"http://127.0.0.1:{dashboard}"
    finally:
        cluster.shutdown()


def wait_for(condition, what, timeout, log=None):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"no {what} in {timeout} s" + (f"; the log ends:\n{log()[-4000:]}" if log else "")
        time.sleep(0.2)


def test_a_job_on_two_worker_nodes_survives_losing_a_whole_node(cluster, tmp_path, mnist_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster, workers, address = cluster
    pids = tmp_path / "ranks"
    pids.mkdir()
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(MNIST_DATA_DIR=str(mnist_dir), MNIST_STORAGE=str(tmp_path / "runs"),
                                   MNIST_DIST_PID_DIR=str(pids))
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(runtime_env))
    env = dict(os.environ)
    for _attempt in range(60):  # the dashboard and its job agent come up seconds after the head
        submit = subprocess.run(
            [RAY, "job", "submit", "--no-wait", "--address", address, "--submission-id", "multinode",
             "--runtime-env", str(tmp_path / "env.yaml"), "--", "bash", "jobs/pipeline.sh", "--preset", "smoke",
             "--model", "cnn-bn", "--epochs", "3", "--train-limit", "6144", "--val-size", "1000", "--eval-every", "50",
             "--name", "multi", "--max-int8-drop", "5"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout and "Connection" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    # Token authentication is on (conftest): a client without the token is turned away.
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}  # no ~/.ray/auth_token
    refused = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True, env=stranger,
                             timeout=120)
    assert refused.returncode != 0 and "Token authentication is enabled" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    client = JobSubmissionClient(address)
    run_dir = tmp_path / "runs" / "multi"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def committed():
        assert client.get_job_status("multinode") not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs("multinode")[-3000:]
        return snapshot.exists() and "checkpoint_epoch001" in snapshot.read_text()

    wait_for(committed, "committed checkpoint", 400)
    first = {rank: (pids / f"rank{rank}.node").read_text() for rank in (0, 1)}
    worker_ids = {node.node_id for node in workers}
    assert set(first.values()) == worker_ids  # one training worker on each worker node, none on the head

    victim = next(node for node in workers if node.node_id == first[1])
    cluster.remove_node(victim, allow_graceful=False)  # its raylet and its workers, at once
    replacement = cluster.add_node(num_cpus=1)
    wait_for(lambda: client.get_job_status("multinode") in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED),
             "finished job", 600)
    logs = client.get_job_logs("multinode")
    assert client.get_job_status("multinode") == JobStatus.SUCCEEDED, logs[-4000:]
    after = {rank: (pids / f"rank{rank}.node").read_text() for rank in (0, 1)}
    assert set(after.values()) == (worker_ids - {victim.node_id}) | {replacement.node_id}
    assert "resumed from" in logs and logs.count("epoch 1/3: validation accuracy") == 1  # epoch 1 was not trained twice
    result = json.loads((run_dir / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    # A node lost without notice is a failure; the steps past the last checkpoint are trained again.
    assert [(r["reason"], r["workers"]) for r in result["resizes"]] == [("start", 2), ("failure", 2)], result["resizes"]
    assert result["lost_steps"] >= 0
    assert json.loads((run_dir / "export" / "report.json").read_text())["verified"] is True
    assert "verified export written to" in logs
    best = json.loads((run_dir / "best.json").read_text())
    assert (run_dir / best["checkpoint"] / "state.json").is_file()
    for checkpoint in sorted(run_dir.glob("checkpoint_epoch*")):  # the replicas stayed identical across the restart
        digests = {json.loads(p.read_text())["weights_sha256"] for p in checkpoint.glob("replica-*.json")}
        assert len(digests) == 1, checkpoint


def read_progress(run_dir):
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def weights(checkpoint):
    from mnist_dist.checkpoint import load_model

    return load_model(checkpoint)[0].get_weights()


@pytest.fixture
def spot_cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # Read by Ray Train's controller and preemption watcher, in the cluster's processes.
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    from test_jobs import free_port

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port()})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    session = cluster.head_node.get_session_dir_path()
    try:
        yield cluster, nodes
    finally:
        try:
            cluster.shutdown()
        finally:  # a node the test killed can leave Cluster.shutdown short of the others
            subprocess.run(["pkill", "-9", "-f", session], check=False)


def test_a_spot_run_loses_no_step_to_a_preemption_and_grows_back_to_the_same_weights(spot_cluster, tmp_path, mnist_dir):
    """2 workers -> a drained node (a spot notice, 15 s) -> 1 worker -> a node joins -> 2 workers,
    against an uninterrupted 2-worker run. Prints the figures docs/spot.md quotes."""
    cluster, nodes = spot_cluster
    pids, storage = tmp_path / "ranks", tmp_path / "runs"
    pids.mkdir()
    notice = 15
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)} | {
        "MNIST_DATA_DIR": str(mnist_dir), "MNIST_DIST_PID_DIR": str(pids)}
    # 1,500 steps of at least 20 ms (spot.STEP_FLOOR_ENV, the spot run only): on any CPU, the
    # notice, the restart on one worker and a node joining all come well before the end
    # (the node joins near step 800).
    epochs = 5
    common = ["--preset", "smoke", "--address", cluster.address, "--epochs", str(epochs), "--train-limit", "38400",
              "--val-size", "1000", "--eval-every", "100", "--checkpoint-every", "0", "--keep", "10", "--storage", str(storage),
              "--max-int8-drop", "5"]
    log = open(tmp_path / "spot.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", "pipeline", *common, "--name", "spot",
                               "--workers", "1-2", "--resize-interval", "5"],
                              stdout=log, stderr=subprocess.STDOUT, env=env | {"MNIST_DIST_STEP_FLOOR_S": "0.02"}, cwd=tmp_path)
    run_dir = storage / "spot"

    def spot_log():
        return (tmp_path / "spot.log").read_text()
    try:
        steps_per_epoch = 300  # 38,400 images / global batch 128
        wait_for(lambda: driver.poll() is None and read_progress(run_dir).get("global_step", 0) >= steps_per_epoch + 30,
                 "training in epoch 2", 300, spot_log)
        victim_id = (pids / "rank1.node").read_text()
        victim = next(node for node in nodes if node.node_id == victim_id)
        drained_at = time.time()
        # The spot pods' preStop hook (k8s/overlays/gpu-spot), as the kubelet runs it on a reclaim;
        # in a pod it finds its node itself, here every node has the same address.
        drain = subprocess.Popen(["bash", str(ROOT / "scripts" / "spot-drain.sh"), str(notice)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=env | {"RAY_ADDRESS": cluster.address, "RAY_NODE_ID": victim_id,
                                            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})

        def checkpointed_for_the_deadline():
            assert drain.poll() in (None, 0), drain.stdout.read()  # the hook itself failed
            return read_progress(run_dir).get("stopping") == "preemption"
        wait_for(checkpointed_for_the_deadline, "just-in-time checkpoint", notice + 10, spot_log)
        stopped_at, jit_step = time.time(), read_progress(run_dir)["global_step"]
        assert (run_dir / f"checkpoint_step{jit_step:08d}" / "state.json").is_file()
        assert jit_step % steps_per_epoch, "the notice came mid-epoch"
        # The cloud takes the VM at the deadline (Ray leaves that to the caller); Ray Train has by
        # then stopped the group and counted a preemption, and the drained node, idle, may be gone already.
        time.sleep(max(0.0, drained_at + notice - time.time()))
        cluster.remove_node(victim, allow_graceful=False)
        drained = drain.stdout.read()
        assert drain.wait(timeout=60) == 0 and re.search(rf"drains; Ray Train stops its workers within ({notice - 1}|{notice}) s", drained), drained

        def training_on(workers, past):
            assert driver.poll() is None, f"the run ended first; the log ends:\n{spot_log()[-4000:]}"
            progress = read_progress(run_dir)
            return progress.get("workers") == workers and progress.get("global_step", 0) > past
        wait_for(lambda: training_on(1, jit_step), "training on the remaining worker", 180, spot_log)
        trained_through, back_after = stopped_at - drained_at, time.time() - stopped_at
        one_worker_step = read_progress(run_dir)["global_step"]

        joined_at = time.time()
        cluster.add_node(num_cpus=1)
        wait_for(lambda: training_on(2, one_worker_step), "training on the grown group", 180, spot_log)
        grown_after = time.time() - joined_at
        assert driver.wait(timeout=600) == 0, (tmp_path / "spot.log").read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    logs = (tmp_path / "spot.log").read_text()
    result = json.loads((run_dir / "result.json").read_text())
    resizes = result["resizes"]
    assert [(r["reason"], r["workers"]) for r in resizes] == [("start", 2), ("preemption", 1), ("grow", 2)], resizes
    assert resizes[1]["global_step"] == jit_step and result["lost_steps"] <= 1
    assert [h["epoch"] for h in result["history"]] == list(range(1, epochs + 1))
    for epoch in range(1, epochs + 1):  # every epoch trained once
        assert logs.count(f"epoch {epoch}/{epochs}: validation accuracy") == 1, logs[-4000:]
    assert json.loads((run_dir / "export" / "report.json").read_text())["verified"] is True
    # A checkpoint at the notice, training through it, and the last one just before the deadline.
    noticed = re.search(r"being reclaimed in \d+ s: step checkpoint at global step (\d+) taken", logs)
    assert noticed and int(noticed.group(1)) < jit_step, logs[-4000:]
    print(f"\nspot figures: a {notice} s notice at global step {int(noticed.group(1))}; trained on for {trained_through:.1f} s "
          f"to global step {jit_step}; lost steps {result['lost_steps']}; {back_after:.1f} s from that last checkpoint to "
          f"training on 1 worker; {grown_after:.1f} s from a node joining to training on 2 (resizes {resizes})", flush=True)

    # The same weights as an uninterrupted 2-worker run of the same seed (SGD: the bound of
    # test_loop.py), at the end of the epoch of the last resize. Later the one-worker steps'
    # other float order (1e-7) grows chaotically, as a 3e-8 nudge without any resize does
    # (docs/benchmarks.md, tests/helpers/resize_divergence.py).
    compared = resizes[-1]["global_step"] // steps_per_epoch + 1
    reference = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "train", *common[:-2], "--epochs", str(compared),
                                "--name", "fixed", "--workers", "2"], capture_output=True, text=True, env=env, cwd=tmp_path,
                               timeout=600)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    last = f"checkpoint_epoch{compared:03d}"
    spot, fixed = weights(run_dir / last), weights(storage / "fixed" / last)
    first = weights(storage / "fixed" / "checkpoint_epoch001")  # the scale: how far training moved the weights after it
    movement = max(float(np.abs(a - b).max()) for a, b in zip(fixed, first))
    difference = max(float(np.abs(a - b).max()) for a, b in zip(spot, fixed))
    print(f"spot vs uninterrupted weights at epoch {compared}: max difference {difference:.2e}, movement since epoch 1 "
          f"{movement:.2e}", flush=True)
    assert difference <= 1e-3 * movement


def test_a_run_that_waits_for_room_says_what_it_waits_for_and_starts_when_there_is_room(cluster, tmp_path):
    """Ray Train waits, silently, until the cluster can place the worker group. With one of the
    two worker nodes' CPUs held by another actor, the driver says what is missing; once it is
    freed, the run starts and finishes."""
    import threading

    import ray

    cluster, _workers, _dashboard = cluster
    ray.init(address=cluster.address)
    try:
        blocker = ray.remote(num_cpus=1)(type("Blocker", (), {"ping": lambda self: "held"})).remote()
        assert ray.get(blocker.ping.remote()) == "held"
        proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", "train", "--preset", "smoke", "--synthetic",
                                 "--epochs", "1", "--workers", "2", "--address", cluster.address,
                                 "--storage", str(tmp_path / "runs"), "--name", "waits"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        wanted = "waiting for 2 worker(s) x 1 CPU; the cluster has 1 of 2 CPU free"
        wait_for(lambda: any(wanted in line for line in lines) or proc.poll() is not None, "waiting line", 120)
        assert any(wanted in line for line in lines), "".join(lines)[-3000:]
        assert not any("[rank 0]" in line for line in lines)  # nothing started while it waited
        ray.kill(blocker)
        assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
        reader.join(timeout=10)
    finally:
        if "proc" in locals():
            proc.kill()
        ray.shutdown()
    text = "".join(lines)
    assert text.index("asking Ray for 2 worker(s) x 1 CPU") < text.index(wanted) < text.index("[rank 0]")
    assert json.loads((tmp_path / "runs" / "waits" / "result.json").read_text())["epochs_completed"] == 1


def test_a_sweep_on_the_cluster_whose_driver_is_killed_resumes_and_finishes(cluster, tmp_path, mnist_dir):
    """jobs/tune.sh (the tune overlay's entrypoint) against the cluster (RAY_ADDRESS) with its
    settings in the environment: one trial per worker node at a time; the driver killed once a
    trial has checkpointed, then the same command finishes the sweep, each unfinished trial
    resuming its own run, and exports the best trial."""
    cluster, _workers, _dashboard = cluster
    storage = tmp_path / "sweeps"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "MNIST_DATA_DIR": str(mnist_dir), "MNIST_STORAGE": str(storage),
           "MNIST_RUN_NAME": "s", "MNIST_PRESET": "smoke", "MNIST_EPOCHS": "3", "MNIST_TRIAL_WORKERS": "1",
           "MNIST_TUNE_SPACE": "lr=0.05,0.0005 seed=0,1", "MNIST_EXTRA_ARGS": "--train-limit 2048 --val-size 500 --eval-every 16",
           "MNIST_EXPORT_ARGS": "--max-int8-drop 5"}
    command = ["bash", str(ROOT / "jobs" / "tune.sh")]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        # A good trial's first checkpoint, taken in by Ray Train: ASHA goes on with it, so the
        # resumed sweep restarts it, and its run resumes from that checkpoint. (A poor trial
        # ASHA has stopped is not restarted.)
        snapshot = storage / "s" / "trial-00000" / "checkpoint_manager_snapshot.json"
        wait_for(lambda: driver.poll() is None and snapshot.exists() and "checkpoint_epoch001" in snapshot.read_text(),
                 "the first checkpoint of trial-00000 (lr 0.05)", 300, lambda: (tmp_path / "first.log").read_text())
        os.killpg(driver.pid, signal.SIGKILL)  # the script and its driver: Ray ends the job, its trials and their runs
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    assert json.loads((storage / "s" / "tune.json").read_text())["status"] == "running"
    again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                             start_new_session=True)
    try:
        out = again.communicate(timeout=900)[0]
    finally:
        if again.poll() is None:  # the script's sweep driver too, not bash alone
            os.killpg(again.pid, signal.SIGKILL)
    assert again.returncode == 0, out[-5000:]
    assert "resuming the sweep from" in out and "resumed from checkpoint_epoch" in out, out[-5000:]
    record = json.loads((storage / "s" / "tune.json").read_text())
    assert record["status"] == "finished" and len(record["trials"]) == 4, record
    assert all(t["status"] in ("finished", "stopped early") for t in record["trials"]), record["trials"]
    assert record["best"]["params"]["learning_rate"] == 0.05 and record["best"]["epochs"] == 3
    best = json.loads((storage / "s" / record["best"]["name"] / "result.json").read_text())
    assert [h["epoch"] for h in best["history"]] == [1, 2, 3]
    # The best trial's best checkpoint, exported and verified on the cluster's nodes' files.
    report = json.loads((storage / "s" / record["best"]["name"] / "export" / "report.json").read_text())
    assert report["verified"] is True and report["checkpoint"] == Path(best["best_checkpoint"]).name
    assert "verified export written to" in out
