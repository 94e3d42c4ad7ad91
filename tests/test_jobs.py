"""`ray job submit` against a real local cluster (`ray start --head` on 127.0.0.1)."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str, env) -> None:
    """Stop only this test's cluster: `ray stop` would end every Ray on the machine,
    a developer's own runs included. Its processes all name its private temp dir."""
    mine = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    mine.append(int(proc.name))
            except OSError:
                continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster():
    """A `ray start --head` cluster, shared by the module's tests (starting one takes seconds)."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray puts Unix sockets in it
    # As a user would: with the project's environment active, so `python` in the job is that one.
    # With token authentication, as conftest sets it: the cluster and the job CLI share the token.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            # Its own agent port: the default 52365 may be another Ray's on this machine,
                            # and then the job agent never starts ("No available agent").
                            f"--dashboard-agent-listen-port={free_port()}",
                            "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(temp_dir, env)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submitted_pipeline_trains_exports_and_succeeds(cluster, tmp_path, mnist_dir):
    address, env = cluster
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MNIST_DATA_DIR"] = str(mnist_dir)
    runtime_env["env_vars"]["MNIST_STORAGE"] = str(tmp_path / "runs")
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(runtime_env))
    job_id = "mnist_test_job"
    for _attempt in range(30):  # the job agent comes up a few seconds after `ray start` returns
        submit = subprocess.run(
            [RAY, "job", "submit", "--no-wait", "--address", address, "--submission-id", job_id,
             "--runtime-env", str(tmp_path / "env.yaml"), "--",
             "bash", "jobs/pipeline.sh", "--preset", "smoke", "--epochs", "2", "--name", "job",
             # A 2-epoch smoke net is too weak for the 0.1 pp int8 gate (tests/test_export.py covers it).
             "--max-int8-drop", "5"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        if "No available agent" not in submit.stderr + submit.stdout:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    logs = subprocess.run([RAY, "job", "logs", "--follow", "--address", address, job_id],
                          capture_output=True, text=True, env=env, timeout=600)
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, logs.stdout[-4000:]
    run_dir = tmp_path / "runs" / "job"
    best = json.loads((run_dir / "best.json").read_text())
    assert (run_dir / best["checkpoint"] / "state.json").is_file()
    assert json.loads((run_dir / "export" / "report.json").read_text())["verified"] is True
    assert "verified export written to" in logs.stdout


def test_the_embedded_ray_starts_its_own_beside_a_running_cluster(cluster, tmp_path):
    """`ray.init()` without an address joins a cluster that `ray start` left running on the
    machine; the embedded local Ray must start its own (it passes address="local")."""
    from conftest import run_cli

    proc = run_cli("train", "--preset", "smoke", "--epochs", "1", "--workers", "1", "--synthetic",
                   "--storage", tmp_path, "--name", "beside")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "beside" / "result.json").read_text())["epochs_completed"] == 1
