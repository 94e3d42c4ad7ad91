"""No command or flag of the project deletes a folder it did not make (mnist_dist/ownership.py).

The refusals are decided before any model is loaded, so they are tested in this process on a
run of fake files (quick); what replaces a real export or checkpoint runs the real command on a
real trained run (slow). Every case checks afterwards that every file the user had is still
there, byte for byte.
"""
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from mnist_dist import ownership
from mnist_dist.export import ExportOptions, export
from mnist_dist.store import Location


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, but a run's `.lock`: each command that takes it writes its own name there."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def fake_run(tmp_path):
    """A finished run's files, with a checkpoint no model could load: every refusal comes before loading."""
    run = tmp_path / "storage" / "small"
    checkpoint = run / "checkpoint_epoch001"
    checkpoint.mkdir(parents=True)
    ownership.mark(checkpoint, "checkpoint")
    (checkpoint / "model.keras").write_bytes(b"not a model")
    (checkpoint / "state.json").write_text("{}")
    (run / "best.json").write_text(json.dumps({"checkpoint": "checkpoint_epoch001", "epoch": 1}))
    (run / "result.json").write_text(json.dumps({"epochs_completed": 1, "history": [], "config": {}}))
    return run


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


def export_refused(run: Path, out: Path, *expected: str, force: bool = True) -> str:
    with pytest.raises(ownership.OwnershipError) as raised:
        export(run=run, out=out, options=ExportOptions(force=force), log=lambda _: None)
    line = str(raised.value)
    for text in expected:
        assert text in line, line
    return line


@pytest.mark.parametrize("where", ["the run itself", "the storage holding the run", "a checkpoint of the run"])
def test_export_never_replaces_the_run_it_reads_even_with_force(fake_run, where):
    out = {"the run itself": fake_run, "the storage holding the run": fake_run.parent,
           "a checkpoint of the run": fake_run / "checkpoint_epoch001"}[where]
    before = snapshot(fake_run.parent)
    line = export_refused(fake_run, out, str(out), "left as it is", "Fix:")
    assert "which this command reads" in line or "run directory" in line
    assert snapshot(fake_run.parent) == before


def test_export_never_replaces_a_folder_of_user_files_even_with_force(fake_run, tmp_path):
    folder = user_folder(tmp_path / "mine", notes_txt="my notes", data_csv="1,2,3")
    before = snapshot(folder)
    export_refused(fake_run, folder, "did not write", "Fix: choose another --out")
    assert snapshot(folder) == before


def test_an_unverified_report_json_does_not_make_a_folder_replaceable(fake_run, tmp_path):
    # Before, a report.json without "verified": true was enough to replace the folder, user files and all.
    folder = user_folder(tmp_path / "out", report_json=json.dumps({"verified": False}), thesis_tex="years of work")
    before = snapshot(folder)
    export_refused(fake_run, folder, "did not write", force=False)
    assert snapshot(folder) == before


def test_a_rejected_folder_of_user_files_is_refused_up_front(fake_run, tmp_path):
    folder = user_folder(tmp_path / "out.rejected", keep_txt="mine")
    before = snapshot(folder)
    export_refused(fake_run, tmp_path / "out", "out.rejected", "did not write", force=False)
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def test_a_marker_alone_does_not_make_foreign_files_replaceable(fake_run, tmp_path):
    folder = user_folder(tmp_path / "out", keep_txt="mine")
    ownership.mark(folder, "export")
    before = snapshot(folder)
    export_refused(fake_run, folder, "does not write (keep.txt)")
    assert snapshot(folder) == before


def test_a_symbolic_link_is_never_replaced(fake_run, tmp_path):
    target = user_folder(tmp_path / "elsewhere", keep_txt="mine")
    (tmp_path / "out").symlink_to(target)
    export_refused(fake_run, tmp_path / "out", "symbolic link")
    assert (tmp_path / "out").is_symlink() and snapshot(target) == {"keep.txt": b"mine"}


def test_a_folder_holding_only_a_run_config_is_a_run(tmp_path):
    """One list of what makes a run (ownership.RUN_FILES), for export and training alike."""
    from mnist_dist.rundir import check_is_run_or_new

    started = user_folder(tmp_path / "started", config_json="{}")  # a run that has written only its config.json
    assert ownership.why_not_replaceable(Location.of(started), "export") == "is a training run directory"
    check_is_run_or_new(Location.of(started))  # and training may continue it


@pytest.mark.slow  # exports
def test_a_rejected_export_replaces_only_an_earlier_rejected_export(run_copy, tmp_path):
    args = ("export", "--run", run_copy, "--out", tmp_path / "out", "--tolerance", "0")  # the fp32 rule must fail
    for _ in range(2):  # the second run replaces the first run's rejected files
        proc = run_cli(*args)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # exit 1: verification failed
        assert "FAILED rule fp32_logit_tolerance" in proc.stdout
        report = json.loads((tmp_path / "out.rejected" / "report.json").read_text())
        assert report["verified"] is False and not (tmp_path / "out").exists()
    (tmp_path / "out.rejected" / "mine.txt").write_text("a note I left here")
    refused(run_cli(*args), "out.rejected", "(mine.txt)")
    assert (tmp_path / "out.rejected" / "mine.txt").read_text() == "a note I left here"


@pytest.mark.slow  # trains
def test_a_checkpoint_is_replaced_only_when_it_is_one_of_ours(tmp_path):
    """The in-process session re-trains an epoch whose checkpoint was cut off mid-write."""
    from mnist_dist.config import TrainConfig
    from mnist_dist.loop import train
    from mnist_dist.sessions import DirectorySession

    config = TrainConfig(model="lenet5", epochs=2, batch_size=50, workers=1, synthetic=True, train_limit=500,
                         val_size=100, eval_every=1000)
    train(config, DirectorySession(Location.of(tmp_path)), log=lambda _: None)
    broken = tmp_path / "checkpoint_epoch002" / "model.keras"
    broken.write_bytes(broken.read_bytes()[:1000])
    final = train(config, DirectorySession(Location.of(tmp_path)), log=lambda _: None)  # retrains epoch 2 over its own debris
    assert final["epoch"] == 2 and (tmp_path / "checkpoint_epoch002" / ownership.MARKER).is_file()
    # A folder of the user's under that name is not debris: nothing in it is touched.
    shutil.rmtree(tmp_path / "checkpoint_epoch002")
    user_folder(tmp_path / "checkpoint_epoch002", keep_txt="mine")
    with pytest.raises(ownership.OwnershipError, match="did not write"):
        train(config, DirectorySession(Location.of(tmp_path)), log=lambda _: None)
    assert snapshot(tmp_path / "checkpoint_epoch002") == {"keep.txt": b"mine"}
    assert not list(tmp_path.glob(".checkpoint_epoch002.tmp-*"))  # its staging copy is gone


def test_the_rule_by_itself(tmp_path):
    def reason(path, kind, protected=()):
        return ownership.why_not_replaceable(Location.of(path), kind, tuple(Location.of(p) for p in protected))

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


def test_report_never_writes_into_a_folder_of_user_files(fake_run, tmp_path):
    from mnist_dist.report import write_report

    mine = user_folder(tmp_path / "mine", report_md="my own report", notes_txt="keep me")
    before = snapshot(mine)
    for out, expected in ((mine, "did not write"), (fake_run, "is or contains")):
        with pytest.raises(ownership.OwnershipError, match=expected):
            write_report(fake_run, out=out, log=lambda _: None)
    assert snapshot(mine) == before


def test_baseline_and_bench_never_overwrite_a_file_they_did_not_write(fake_run, tmp_path):
    from mnist_dist import baselines
    from mnist_dist.bench import check_json_path
    from mnist_dist.config import TrainConfig

    mine = tmp_path / "figures.json"
    mine.write_text('{"my": "numbers"}')
    for where in ({"out": Location.of(mine)}, {"run_dir": Location.of(fake_run)}):
        (fake_run / "baselines.json").write_text('{"my": "numbers"}')
        with pytest.raises(ownership.OwnershipError, match="`mnist-dist baseline` did not write"):
            baselines.run(TrainConfig(epochs=1), epochs=1, log=lambda _: None, **where)
    with pytest.raises(ownership.OwnershipError, match="`mnist-dist bench` did not write"):
        check_json_path(str(mine))
    with pytest.raises(ownership.OwnershipError, match="exists and is not a file"):
        check_json_path(str(tmp_path))
    assert mine.read_text() == '{"my": "numbers"}' and (fake_run / "baselines.json").read_text() == '{"my": "numbers"}'
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"made_by": "mnist-dist baseline", "baselines": []}))
    ownership.check_file_replaceable(Location.of(ours), "mnist-dist baseline", "x")  # an earlier one of ours is replaced
