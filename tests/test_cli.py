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
