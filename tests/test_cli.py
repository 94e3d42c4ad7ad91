from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.parametrize("command", [[], ["data"], ["train"], ["export"], ["pipeline"], ["predict"]])
def test_every_command_has_help(command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mnist-dist")


def test_bad_option_values_name_the_fix(tmp_path):
    proc = run_cli("train", "--in-process", "--synthetic", "--model", "resnet", "--storage", tmp_path)
    assert proc.returncode == 2 and "unknown model 'resnet'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--in-process", "--synthetic", "--epochs", "0", "--storage", tmp_path)
    assert proc.returncode == 2 and "--epochs must be >= 1" in proc.stderr
    proc = run_cli("train", "--synthetic", "--steps-per-execution", "0", "--storage", tmp_path)
    assert proc.returncode == 2 and "--steps-per-execution must be >= 1, got 0" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, named", [
    (("--lr", "inf"), "--lr must be a finite number, got inf"),
    (("--lr", "nan"), "--lr must be a finite number, got nan"),
    (("--l2", "-1"), "--l2 must be >= 0"),
    (("--seed", "-1"), "--seed must be >= 0"),
    (("--train-limit", "0"), "--train-limit 0 is fewer images than one global batch"),
    (("--train-limit", "1"), "--train-limit 1 is fewer images than one global batch"),
    (("--name", "../../x"), "--name '../../x' must be one folder name inside --storage"),
])
def test_values_that_cannot_work_are_refused_up_front(args, named, tmp_path):
    proc = run_cli("train", "--in-process", "--preset", "smoke", "--storage", tmp_path, *args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and named in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written, nothing outside --storage either
    assert not (tmp_path.parent.parent / "x").exists()


@pytest.mark.parametrize("args, named", [
    (("--tolerance", "inf"), "--tolerance must be a finite number >= 0, got inf"),
    (("--tolerance", "-1"), "--tolerance must be a finite number >= 0"),
    (("--max-int8-drop", "nan"), "--max-int8-drop must be a finite number"),
    (("--calibration-images", "-1"), "--calibration-images must be >= 1, got -1"),
])
def test_export_thresholds_are_checked_before_anything_loads(args, named, tmp_path):
    # No run is needed: the thresholds are refused first, before the run, the checkpoint or TensorFlow.
    proc = run_cli("export", "--run", tmp_path / "no-such-run", *args,
                   env={"PYTHONPATH": str(Path(__file__).parent / "helpers" / "no_tensorflow")})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and named in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_storage_that_is_a_file_gets_one_line(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    proc = run_cli("train", "--in-process", "--preset", "smoke", "--storage", tmp_path / "afile", "--name", "r")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "afile: is a file, not a folder. Fix: point --storage at a folder" in proc.stderr
    assert (tmp_path / "afile").read_text() == "not a folder"



def test_a_folder_of_other_files_is_never_trained_into(tmp_path):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    proc = run_cli("train", "--in-process", "--preset", "smoke", "--storage", tmp_path, "--name", "Documents")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "Documents: holds files (notes.txt) but no run of mnist-dist" in line and "Fix: pass a new --name" in line
    assert [p.name for p in docs.iterdir()] == ["notes.txt"]  # not even a lock file
