"""Storage that fails under a running run, for real: a local folder turned read-only, and an
S3-compatible server (moto's) that goes away. Each run stops with one line that names
the location, the error and the fix (exit 2), keeps its committed checkpoints, and the same
command run again resumes from them."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import BUCKET, S3_CREDENTIALS, free_port, run_cli

pytestmark = pytest.mark.slow
TRAIN = ["train", "--preset", "smoke", "--epochs", "4", "--train-limit", "4096", "--workers", "2", "--name", "r"]


def assert_stopped_in_one_line(proc, location: str, reason: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    # No traceback of the fault, from the driver or a worker. (Ray's own transient warnings
    # of a loaded machine, such as the controller's timed-out resource request, may show.)
    traced = [line for line in out.splitlines() if not line.startswith("error: ") and any(
        name in line for name in ("Error in training function", "OSError", "StorageError", "TrainingFailedError",
                                  "WorkerGroupError", "ControllerError"))]
    assert not traced, "\n".join(traced[:10]) + "\n" + out[-4000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {location}") and "the run's storage failed while training" in line, line
    assert reason in line and "Fix: " in line and "run the same command again to resume" in line, line
    return line


def assert_resumed_whole(proc, history_of) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from checkpoint_epoch" in out, out[-3000:]
    assert [h["epoch"] for h in history_of()] == [1, 2, 3, 4]


def can_unshare_mounts() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode == 0


# In one process: Ray Train's own storage path (a worker's checkpoint persisted through Ray)
# fails under the bucket test below, whose run is on Ray.
@pytest.mark.skipif(not can_unshare_mounts(), reason="this machine gives no mount namespace (unshare --mount)")
def test_a_local_run_whose_folder_turns_read_only_stops_in_one_line_and_resumes(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    extra = ["--in-process"]
    committed = f"test -e {runs}/r/checkpoint_epoch001/state.json"  # in one process: once its state.json is in place
    # In a mount namespace of its own, the run's folder is a bind mount of itself; once the
    # first epoch's checkpoint is committed it is replaced by a read-only view of the same
    # folder (files already open stay writable, as on a disk remounted read-only under a
    # running process). The watcher gives up with the run.
    script = f"""
        set -e
        mount --bind {runs} {runs}
        {sys.executable} -m mnist_dist.cli {' '.join(TRAIN + extra)} --storage {runs} &
        run=$!
        until {committed}; do kill -0 $run 2>/dev/null || break; sleep 0.1; done
        umount -l {runs} && mount --bind -r {runs} {runs}
        wait $run
    """
    env = {**os.environ, "MNIST_DATA_DIR": str(mnist_dir)}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          capture_output=True, text=True, env=env, timeout=600)
    assert_stopped_in_one_line(proc, str(runs / "r"), "Read-only file system")
    assert not (runs / "r" / "result.json").exists()
    again = run_cli(*TRAIN, *extra, "--storage", runs, env={"MNIST_DATA_DIR": str(mnist_dir)})
    assert_resumed_whole(again, lambda: json.loads((runs / "r" / "result.json").read_text())["history"])


class Gate:
    """A TCP relay in front of the S3 server. Cut, it drops its connections and refuses new
    ones: the endpoint went away, while the server behind it keeps its objects. (A server
    stopped with SIGSTOP is the same fault, but pyarrow waits out three 30 s attempts per
    request before it says so: docs/storage.md.)"""

    def __init__(self, port: int):
        self.target, self.connections, self.cut_off = port, [], False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # cut
            server = socket.create_connection(("127.0.0.1", self.target))
            self.connections += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self):
        self.listener.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()


@pytest.fixture
def own_s3(tmp_path):
    """A moto server of this test's own, reached through a Gate that the test may cut."""
    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    deadline = time.time() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            assert time.time() < deadline and server.poll() is None
            time.sleep(0.2)
    gate = Gate(port)
    try:
        yield gate, env, client
    finally:
        gate.cut()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def test_a_bucket_run_whose_object_store_goes_away_stops_in_one_line_and_resumes(own_s3, tmp_path, mnist_dir):
    gate, env, client = own_s3
    env = {**env, "MNIST_DATA_DIR": str(mnist_dir)}
    storage = f"s3://{BUCKET}/runs"
    proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", *TRAIN, "--storage", storage],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, **env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{gate.port}"})

    def committed() -> bool:  # in Ray Train's snapshot
        try:
            body = client.get_object(Bucket=BUCKET, Key="runs/r/checkpoint_manager_snapshot.json")["Body"].read()
        except client.exceptions.NoSuchKey:
            return False
        return b"checkpoint_epoch001" in body

    deadline = time.time() + 300
    while not committed():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the run ended or took too long before its first checkpoint:\n" + "".join(proc.communicate())[-3000:])
        time.sleep(0.2)
    gate.cut()  # the server keeps its objects; the run reaches it no more
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    stopped = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = assert_stopped_in_one_line(stopped, f"{storage}/r", "")
    assert re.search(r"[Cc]ould not connect|[Cc]onnection|curlCode|[Tt]imeout", line), line  # the cause, as the store's client gave it
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/r/")["Contents"]]
    assert "runs/r/checkpoint_epoch001/model.keras" in keys and "runs/r/result.json" not in keys
    # The store back (the same server, without the gate):
    again = run_cli(*TRAIN, "--storage", storage, env=env, cwd=tmp_path)

    def history():
        body = client.get_object(Bucket=BUCKET, Key="runs/r/result.json")["Body"].read()
        return json.loads(body)["history"]

    assert_resumed_whole(again, history)
