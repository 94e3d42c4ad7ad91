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
    (("--tolerance", "inf"), "--tolerance must be a finite number >= 0, got inf"),
])
def test_export_thresholds_are_checked_before_anything_loads(args, named, tmp_path):
    # No run is needed: the thresholds are refused first, before the run, the checkpoint or
    # TensorFlow (which the helper makes unimportable). Every rule: tests/test_rules.py.
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
