"""One writer per run: real concurrent commands on one run directory (rundir.locked)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
TRAIN = ["train", "--preset", "smoke", "--in-process", "--synthetic", "--epochs", "4"]


def start(storage, *extra):
    return subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", *TRAIN, "--storage", str(storage), "--name", "one",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    first = start(tmp_path)
    lock = tmp_path / "one" / ".lock"
    wait_for(lambda: lock.is_file() and f"pid {first.pid} " in lock.read_text(), first, "lock")
    for args in (TRAIN, ["pipeline", *TRAIN[1:]], ["export", "--run", tmp_path / "one"]):
        proc = run_cli(*args[:1], *args[1:], *([] if args[0] == "export" else ["--storage", tmp_path, "--name", "one"]))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert f"in use by `mnist-dist train --in-process` (pid {first.pid} on " in line and "since" in line, line
        assert "Fix: wait for that command to finish, or pass another --name" in line and "Traceback" not in proc.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    history = json.loads((tmp_path / "one" / "result.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the refused commands wrote nothing into it


def test_the_lock_of_a_killed_command_is_taken_over_and_the_run_resumes(tmp_path):
    first = start(tmp_path)
    wait_for(lambda: (tmp_path / "one" / "checkpoint_epoch001" / "state.json").is_file(), first, "first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    proc = run_cli(*TRAIN, "--storage", tmp_path, "--name", "one")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    assert f"pid {first.pid} " not in (tmp_path / "one" / ".lock").read_text()
