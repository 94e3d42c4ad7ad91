"""Runs and exports on other filesystems than the temporary directory's: a second one, a
read-only one and a full one, each a real tmpfs mounted for the test."""
import json
import subprocess

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str):
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"this machine lets no test mount a tmpfs ({proc.stderr.strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_an_in_process_run_on_another_filesystem_checkpoints_and_finishes(tmpfs):
    storage = tmpfs("nfs-like", "size=200m")  # checkpoints are made in the temporary directory, on another filesystem
    proc = run_cli("train", "--preset", "smoke", "--in-process", "--synthetic", "--storage", storage, "--name", "r")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # rename() raised EXDEV here before
    assert json.loads((storage / "r" / "result.json").read_text())["epochs_completed"] == 2
    assert sorted(p.name for p in (storage / "r").iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint_epoch001", "checkpoint_epoch002"]  # no staging folder left behind


def test_an_export_into_a_read_only_or_full_folder_gets_one_line(small_run, tmpfs):
    for folder, expected in ((tmpfs("read-only", "ro,size=1m"), "cannot write the export there (Read-only file system)"),
                             (tmpfs("full", "size=256k"), "writing the export failed (No space left on device); nothing was published")):
        proc = run_cli("export", "--run", small_run, "--out", folder / "export")
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and expected in line, line
        assert not (folder / "export").exists() and not [p for p in folder.iterdir()]  # nothing half-written left
