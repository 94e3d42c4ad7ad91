"""A real local cluster (`ray start --head` on 127.0.0.1) beside the embedded local Ray. `ray job submit`
of jobs/pipeline.sh runs on the multi-node cluster of tests/test_cluster.py."""
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


def test_the_embedded_ray_starts_its_own_beside_a_running_cluster(cluster, tmp_path):
    """`ray.init()` without an address joins a cluster that `ray start` left running on the
    machine; the embedded local Ray must start its own (it passes address="local")."""
    from conftest import run_cli

    proc = run_cli("train", "--preset", "smoke", "--epochs", "1", "--workers", "1", "--synthetic",
                   "--storage", tmp_path, "--name", "beside")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "beside" / "result.json").read_text())["epochs_completed"] == 1
