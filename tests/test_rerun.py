"""Running the same command again (a retried Ray job, a re-applied RayJob, a user) finishes
what is left, and refuses what would mix two configurations (mnist_dist/rundir.py)."""
import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
SMOKE = ("--preset", "smoke", "--in-process", "--epochs", "1", "--max-int8-drop", "5")  # about re-runs, not int8 quality


def pipeline(storage, *extra):
    return run_cli("pipeline", *SMOKE, "--storage", storage, "--name", "again", *extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished in-process run with its verified export."""
    storage = tmp_path_factory.mktemp("rerun")
    proc = pipeline(storage)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return storage


def test_a_finished_run_without_an_export_is_only_exported(finished, tmp_path):
    proc = pipeline(finished, "--export-dir", tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to train" in proc.stdout and "verified export written to" in proc.stdout
    assert json.loads((tmp_path / "elsewhere" / "report.json").read_text())["checkpoint"] == "checkpoint_epoch001"


def test_more_epochs_continue_the_run_and_the_pipeline_exports_the_new_best(tmp_path):
    first = pipeline(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    proc = pipeline(tmp_path, "--epochs", "2", "--steps-per-execution", "3")  # how it trains may change
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "epoch 1/2" not in proc.stdout and "epoch 2/2" in proc.stdout
    result = json.loads((tmp_path / "again" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    report = json.loads((tmp_path / "again" / "export" / "report.json").read_text())
    best = json.loads((tmp_path / "again" / "best.json").read_text())
    assert report["checkpoint"] == best["checkpoint"] == f"checkpoint_epoch{result['best_epoch']:03d}"


def test_a_diverging_run_stops_with_one_line_and_keeps_no_bad_checkpoint(tmp_path):
    proc = run_cli("train", "--preset", "smoke", "--in-process", "--synthetic", "--lr", "1e12", "--storage", tmp_path,
                   "--name", "nan")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and line.startswith("error: training diverged: the loss is nan"), line
    assert "Fix: a lower --lr" in line
    assert not list((tmp_path / "nan").glob("checkpoint_epoch*")) and not (tmp_path / "nan" / "best.json").exists()


def test_a_copied_run_exports_from_its_own_files(finished, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished / "again", copy)
    shutil.rmtree(copy / "export")
    shutil.move(str(finished / "again"), tmp_path / "original-moved-away")  # the original's paths are gone
    try:
        proc = run_cli("export", "--run", copy, "--max-int8-drop", "5")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"from {copy / 'checkpoint_epoch001'}" in proc.stdout
    finally:
        shutil.move(str(tmp_path / "original-moved-away"), finished / "again")


def test_a_finished_pipeline_asked_for_int4_re_exports_once(finished):
    """The export of the best checkpoint is there, without the int4 file now asked for: the run is
    exported again (nothing trained), and the next same command has nothing to do."""
    proc = pipeline(finished, "--int4", "--max-int4-drop", "5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nothing to train" in proc.stdout and "quantized to int4 weights" in proc.stdout
    assert "int4" in json.loads((finished / "again" / "export" / "report.json").read_text())
    again = pipeline(finished, "--int4", "--max-int4-drop", "5")
    assert again.returncode == 0 and "nothing to export" in again.stdout, again.stdout[-2000:]
