"""A real multi-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`): a
head that runs no training, two worker nodes, `ray job submit`, and a whole node killed."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def wait_for(condition, what, timeout):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"no {what} in {timeout} s"
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
    assert json.loads((run_dir / "export" / "report.json").read_text())["verified"] is True
    for checkpoint in sorted(run_dir.glob("checkpoint_epoch*")):  # the replicas stayed identical across the restart
        digests = {json.loads(p.read_text())["weights_sha256"] for p in checkpoint.glob("replica-*.json")}
        assert len(digests) == 1, checkpoint
