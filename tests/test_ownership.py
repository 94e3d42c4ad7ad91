"""No command or flag of the project deletes a folder it did not make (mnist_dist/ownership.py).

Every case runs the real `mnist-dist export` on a real trained run, or the real checkpoint
session, and checks afterwards that every file the user had is still there, byte for byte.
"""
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from mnist_dist import ownership

pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, but a run's `.lock`: each command that takes it writes its own name there."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def run_copy(small_run, tmp_path):
    """A private copy of the small trained run, under its own storage folder."""
    storage = tmp_path / "storage"
    shutil.copytree(small_run, storage / "small", symlinks=True)
    return storage / "small"


def user_folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def refused(proc, *expected: str):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in line, line
    return line


@pytest.mark.parametrize("where", ["the run itself", "the storage holding the run", "a checkpoint of the run"])
def test_export_never_replaces_the_run_it_reads_even_with_force(run_copy, where):
    out = {"the run itself": run_copy, "the storage holding the run": run_copy.parent,
           "a checkpoint of the run": run_copy / "checkpoint_epoch001"}[where]
    before = snapshot(run_copy.parent)
    line = refused(run_cli("export", "--run", run_copy, "--out", out, "--force"), str(out), "left as it is", "Fix:")
    assert "which this command reads" in line or "run directory" in line
    assert snapshot(run_copy.parent) == before


def test_export_never_replaces_a_folder_of_user_files_even_with_force(run_copy, tmp_path):
    folder = user_folder(tmp_path / "mine", notes_txt="my notes", data_csv="1,2,3")
    before = snapshot(folder)
    refused(run_cli("export", "--run", run_copy, "--out", folder, "--force"), "did not write", "Fix: choose another --out")
    assert snapshot(folder) == before


def test_an_unverified_report_json_does_not_make_a_folder_replaceable(run_copy, tmp_path):
    # Before, a report.json without "verified": true was enough to replace the folder, user files and all.
    folder = user_folder(tmp_path / "out", report_json=json.dumps({"verified": False}), thesis_tex="years of work")
    before = snapshot(folder)
    refused(run_cli("export", "--run", run_copy, "--out", folder), "did not write")
    assert snapshot(folder) == before


def test_a_rejected_folder_of_user_files_is_refused_up_front(run_copy, tmp_path):
    folder = user_folder(tmp_path / "out.rejected", keep_txt="mine")
    before = snapshot(folder)
    refused(run_cli("export", "--run", run_copy, "--out", tmp_path / "out"), "out.rejected", "did not write")
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def test_a_marker_alone_does_not_make_foreign_files_replaceable(run_copy, tmp_path):
    folder = user_folder(tmp_path / "out", keep_txt="mine")
    ownership.mark(folder, "export")
    before = snapshot(folder)
    refused(run_cli("export", "--run", run_copy, "--out", folder, "--force"), "does not write (keep.txt)")
    assert snapshot(folder) == before


def test_a_symbolic_link_is_never_replaced(run_copy, tmp_path):
    target = user_folder(tmp_path / "elsewhere", keep_txt="mine")
    (tmp_path / "out").symlink_to(target)
    refused(run_cli("export", "--run", run_copy, "--out", tmp_path / "out", "--force"), "symbolic link")
    assert (tmp_path / "out").is_symlink() and snapshot(target) == {"keep.txt": b"mine"}


def test_an_empty_folder_is_taken_and_an_earlier_export_replaced_only_with_force(run_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ("export", "--run", run_copy, "--out", out, "--max-int8-drop", "5")  # about ownership, not int8 quality
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files == {ownership.MARKER, "model.onnx", "model.int8.onnx", "report.json", "report.md"}
    refused(run_cli(*args), "previous verified export", "--force")
    proc = run_cli(*args, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or backup folder left


def test_a_rejected_export_replaces_only_an_earlier_rejected_export(run_copy, tmp_path):
    args = ("export", "--run", run_copy, "--out", tmp_path / "out", "--tolerance", "0")  # the fp32 rule must fail
    for _ in range(2):  # the second run replaces the first run's rejected files
        proc = run_cli(*args)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        report = json.loads((tmp_path / "out.rejected" / "report.json").read_text())
        assert report["verified"] is False and not (tmp_path / "out").exists()
    (tmp_path / "out.rejected" / "mine.txt").write_text("a note I left here")
    refused(run_cli(*args), "out.rejected", "(mine.txt)")
    assert (tmp_path / "out.rejected" / "mine.txt").read_text() == "a note I left here"


def test_a_checkpoint_is_replaced_only_when_it_is_one_of_ours(tmp_path):
    """The in-process session re-trains an epoch whose checkpoint was cut off mid-write."""
    from mnist_dist.config import TrainConfig
    from mnist_dist.loop import train
    from mnist_dist.sessions import DirectorySession

    config = TrainConfig(model="lenet5", epochs=2, batch_size=50, workers=1, synthetic=True, train_limit=500,
                         val_size=100, eval_every=1000)
    train(config, DirectorySession(tmp_path), log=lambda _: None)
    broken = tmp_path / "checkpoint_epoch002" / "model.keras"
    broken.write_bytes(broken.read_bytes()[:1000])
    final = train(config, DirectorySession(tmp_path), log=lambda _: None)  # retrains epoch 2 over its own debris
    assert final["epoch"] == 2 and (tmp_path / "checkpoint_epoch002" / ownership.MARKER).is_file()
    # A folder of the user's under that name is not debris: nothing in it is touched.
    shutil.rmtree(tmp_path / "checkpoint_epoch002")
    user_folder(tmp_path / "checkpoint_epoch002", keep_txt="mine")
    with pytest.raises(ownership.OwnershipError, match="did not write"):
        train(config, DirectorySession(tmp_path), log=lambda _: None)
    assert snapshot(tmp_path / "checkpoint_epoch002") == {"keep.txt": b"mine"}
    assert not list(tmp_path.glob(".checkpoint_epoch002.tmp-*"))  # its staging copy is gone


def test_the_rule_by_itself(tmp_path):
    reason = ownership.why_not_replaceable
    assert reason(tmp_path / "missing", "export") is None
    assert reason(user_folder(tmp_path / "empty"), "export") is None
    assert "not a directory" in reason(Path(user_folder(tmp_path / "f", a_txt="x") / "a.txt"), "export")
    run = user_folder(tmp_path / "run", best_json="{}")
    assert "training run directory" in reason(run, "export")
    owned = user_folder(tmp_path / "owned", report_json="{}")
    ownership.mark(owned, "export")
    assert reason(owned, "export") is None
    assert "no .mnist-dist.json marker of a checkpoint" in reason(owned, "checkpoint")  # a kind is not another kind
    (owned / "sub").mkdir()
    assert "does not write (sub)" in reason(owned, "export")  # an export holds no folders
    assert "which this command reads" in reason(tmp_path, "export", protected=(run,))


def test_report_never_writes_into_a_folder_of_user_files(run_copy, tmp_path):
    mine = user_folder(tmp_path / "mine", report_md="my own report", notes_txt="keep me")
    before = snapshot(mine)
    refused(run_cli("report", "--run", run_copy, "--out", mine), str(mine), "did not write", "Fix: choose another --out")
    refused(run_cli("report", "--run", run_copy, "--out", run_copy), "is or contains")
    assert snapshot(mine) == before


def test_baseline_and_bench_never_overwrite_a_file_they_did_not_write(run_copy, tmp_path):
    mine = tmp_path / "figures.json"
    mine.write_text('{"my": "numbers"}')
    refused(run_cli("baseline", "--out", mine, "--epochs", "1"), str(mine), "`mnist-dist baseline` did not write")
    refused(run_cli("bench", "infer", "--run", run_copy, "--json", mine), str(mine), "`mnist-dist bench` did not write")
    refused(run_cli("bench", "train", "--json", tmp_path), "exists and is not a file")
    assert mine.read_text() == '{"my": "numbers"}'
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"made_by": "mnist-dist baseline", "baselines": []}))
    ownership.check_file_replaceable(ours, "mnist-dist baseline", "x")  # an earlier one of ours is replaced
