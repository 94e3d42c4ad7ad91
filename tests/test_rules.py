"""The rules a command applies before it trains or exports, called in this process on runs of
fake files: no Ray, no TensorFlow, no training. What each rule then does for real is tested
end to end in the slow modules (test_rerun.py, test_ownership.py, test_cli.py)."""
import json
import math

import pytest

from mnist_dist import ownership, pipeline, rundir, training
from mnist_dist.config import ConfigError, TrainConfig, preset
from mnist_dist.errors import RunError
from mnist_dist.export import ExportError, ExportOptions, export
from mnist_dist.store import Location

SMOKE = dict(synthetic=True, epochs=1)


def finished_run(storage, name="again", epochs=1, **config):
    """A run as `training.run` leaves it: config.json, result.json, best.json and a checkpoint."""
    config = rundir.settle(preset("smoke", storage=str(storage), name=name, **{**SMOKE, "epochs": epochs, **config}))
    run = rundir.run_dir(config)
    (run / "config.json").write_json(config.to_dict())
    best = {"checkpoint": "checkpoint_epoch001", "epoch": 1, "val_accuracy": 0.9, "global_step": 32}
    (run / "best.json").write_json(best)
    (run / "result.json").write_json({"run_dir": str(run), "best_checkpoint": str(run / "checkpoint_epoch001"),
                                      "best_epoch": 1, "best_val_accuracy": 0.9, "test_accuracy": 0.9,
                                      "epochs_completed": epochs, "history": [], "config": config.to_dict()})
    checkpoint = run / "checkpoint_epoch001"
    (checkpoint / ownership.MARKER).write_json({"made_by": "mnist-dist", "kind": "checkpoint"})
    return config, run


def verified_export(where: Location, checkpoint="checkpoint_epoch001"):
    (where / ownership.MARKER).write_json({"made_by": "mnist-dist", "kind": "export"})
    (where / "report.json").write_json({"verified": True, "checkpoint": checkpoint})


@pytest.mark.parametrize("change, named", [({"model": "tf-tutorial"}, "model='lenet5'"),
                                           ({"batch_size": 32}, r"global batch \(batch_size x workers\)=128"),
                                           ({"learning_rate": 0.01}, "learning_rate=0.05")])
def test_a_re_run_that_would_train_something_else_is_refused(tmp_path, change, named):
    config, run = finished_run(tmp_path)
    before = (run / "config.json").read_bytes()
    with pytest.raises(RunError, match=rf"{named}.*Fix: pass a new --name"):
        rundir.claim(config.replace(epochs=2, **change))
    assert (run / "config.json").read_bytes() == before


def test_a_re_run_may_change_how_long_and_how_not_what(tmp_path):
    config, run = finished_run(tmp_path)
    assert rundir.claim(config.replace(epochs=2, steps_per_execution=3, cpus_per_worker=2, max_failures=5)) is None
    assert (run / "config.json").read_json()["epochs"] == 2  # rewritten: the run now asks for 2


def test_a_re_run_may_change_the_worker_count_at_the_same_global_batch(tmp_path):
    config, run = finished_run(tmp_path)  # 2 workers x 64
    assert rundir.claim(config.replace(epochs=2, workers=1, batch_size=128)) is None
    assert rundir.claim(config.replace(epochs=2, workers=4, min_workers=1, batch_size=32)) is None
    with pytest.raises(RunError, match=r"global batch \(batch_size x workers\)=128.*=256"):
        rundir.claim(config.replace(epochs=2, workers=4, batch_size=64))


@pytest.mark.parametrize("text, expected", [("2", (None, 2)), ("1-4", (1, 4)), (" 3 ", (None, 3)), ("2-2", (2, 2))])
def test_workers_is_a_count_or_an_elastic_range(text, expected):
    from mnist_dist.config import parse_workers

    assert parse_workers(text) == expected


@pytest.mark.parametrize("values, message", [
    ({"workers": "two"}, "--workers 'two' must be a number"),
    ({"workers": "4-1"}, "--workers 4-1: the range must be MIN-MAX with 1 <= MIN <= MAX"),
    ({"workers": "0-2"}, "--workers 0-2: the range must be MIN-MAX"),
    ({"checkpoint_every": "soon"}, "--checkpoint-every 'soon' must be a number of steps"),
    ({"checkpoint_every": "-5s"}, "--checkpoint-every '-5s' must be >= 0"),
    ({"resize_interval": 0.0}, "--resize-interval must be > 0"),
])
def test_bad_elastic_and_checkpoint_settings_are_one_line(values, message):
    from mnist_dist.config import parse_workers

    with pytest.raises(ConfigError, match=message):
        if "workers" in values:
            low, high = parse_workers(values["workers"])
            values = {"min_workers": low, "workers": high}
        TrainConfig(**values).validate()


def test_an_elastic_range_keeps_the_global_batch_of_its_max():
    config = TrainConfig(workers=4, min_workers=1, batch_size=64).validate()
    assert config.elastic and config.worker_range == "1-4" and config.global_batch_size == 256
    assert not TrainConfig(workers=2, min_workers=2).elastic
    assert TrainConfig(checkpoint_every="500").checkpoint_interval == (500, 0.0)
    assert TrainConfig(checkpoint_every="30s").checkpoint_interval == (0, 30.0)
    assert TrainConfig(checkpoint_every="0").checkpoint_interval == (0, 0.0)


def test_train_on_a_finished_run_starts_nothing(tmp_path, capsys):
    config, _run = finished_run(tmp_path)
    result = training.run(config)  # on Ray it would start Ray; the claim returns first
    assert result["best_epoch"] == 1 and "already has 1 epochs: nothing to train" in capsys.readouterr().out


def test_the_pipeline_run_again_finds_its_verified_export(tmp_path, capsys):
    config, run = finished_run(tmp_path)
    verified_export(run / "export")
    before = (run / "export" / "report.json").read_bytes()
    assert pipeline.run(config)["verified"] is True
    out = capsys.readouterr().out
    assert "nothing to train" in out and "verified export of checkpoint_epoch001 already in" in out
    assert (run / "export" / "report.json").read_bytes() == before


def test_the_pipeline_replaces_an_export_of_an_earlier_best(tmp_path, monkeypatch):
    config, run = finished_run(tmp_path)
    verified_export(run / "export", checkpoint="checkpoint_epoch000")
    (tmp_path / "link").symlink_to(tmp_path)  # result.json names the run by another spelling of its folder
    (run / "result.json").write_json({**(run / "result.json").read_json(), "run_dir": str(tmp_path / "link" / "again")})
    asked = {}
    monkeypatch.setattr(pipeline, "export", lambda **kwargs: asked.update(kwargs) or {"verified": True})
    pipeline.run(config)
    assert asked["options"].force is True and asked["out"] == run / "export" and asked["run"] == run


def test_one_process_holds_one_folders_lock_under_any_spelling(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path)
    with Location.of(tmp_path / "run").lock("pipeline"), Location.of(tmp_path / "link" / "run").lock("export"):
        pass  # the pipeline's export, of a run it names another way, takes its own lock again


def test_export_or_report_of_what_is_no_run_is_one_line(tmp_path):
    from mnist_dist.report import write_report

    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(ExportError, match="run directory does not exist"):
        export(run=tmp_path / "result.json")
    _config, run = finished_run(tmp_path)
    from mnist_dist.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"checkpoint_epoch001: checkpoint directory does not exist"):
        (run / "checkpoint_epoch001" / ownership.MARKER).delete()
        (tmp_path / "again" / "checkpoint_epoch001").rmdir()
        write_report(run, log=lambda _: None)


def test_a_folder_of_other_files_is_never_trained_into(tmp_path):
    (tmp_path / "Documents").mkdir()
    (tmp_path / "Documents" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunError, match=r"holds files \(thesis.tex\) but no run of mnist-dist"):
        training.run(preset("smoke", storage=str(tmp_path), name="Documents", **SMOKE))
    assert [p.name for p in (tmp_path / "Documents").iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("values, named", [
    ({"learning_rate": math.inf}, "--lr must be a finite number, got inf"),
    ({"learning_rate": math.nan}, "--lr must be a finite number, got nan"),
    ({"l2": -1.0}, "--l2 must be >= 0"),
    ({"seed": -1}, "--seed must be >= 0"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"steps_per_execution": 0}, "--steps-per-execution must be >= 1, got 0"),
    ({"train_limit": 0}, "--train-limit 0 is fewer images than one global batch"),
    ({"train_limit": 1}, "--train-limit 1 is fewer images than one global batch"),
    ({"name": "../../x"}, "--name '../../x' must be one folder name inside --storage"),
])
def test_values_that_cannot_work_are_refused_up_front(values, named, tmp_path):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        training.run(preset("smoke", storage=str(tmp_path / "runs"), **{**SMOKE, **values}))
    assert not any(tmp_path.iterdir())  # nothing was written, nothing outside --storage either


@pytest.mark.parametrize("options, named", [
    (ExportOptions(tolerance=math.inf), "--tolerance must be a finite number >= 0, got inf"),
    (ExportOptions(tolerance=-1), "--tolerance must be a finite number >= 0"),
    (ExportOptions(max_int8_drop_pp=math.nan), "--max-int8-drop must be a finite number"),
    (ExportOptions(calibration_images=-1), "--calibration-images must be >= 1, got -1"),
    (ExportOptions(opset=21), "opset 21 is not supported"),
])
def test_export_options_are_checked_before_anything_loads(options, named, tmp_path):
    with pytest.raises(ExportError, match=named):
        export(run=tmp_path / "no-such-run", options=options)
    with pytest.raises(ExportError, match=named):  # the pipeline: before minutes of training
        pipeline.run(preset("smoke", storage=str(tmp_path), **SMOKE), options)
    assert not any(tmp_path.iterdir())


def test_a_verified_export_is_replaced_only_with_force(tmp_path):
    _config, run = finished_run(tmp_path)
    out = Location.of(tmp_path / "out")
    verified_export(out)
    with pytest.raises(ExportError, match="holds a previous verified export. Fix: pass --force"):
        export(run=run, out=out)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verified"] is True


def test_a_rejected_export_in_a_bucket_names_where_its_files_went(tmp_path, monkeypatch, s3):
    """With the endpoint in the URI's query, `.rejected` goes before the query, in the line printed too."""
    from conftest import BUCKET, bucket_keys
    from mnist_dist import export as export_mod

    config, run = finished_run(tmp_path)
    state = {"config": config.to_dict(), "epoch": 1, "val_accuracy": 0.9, "model_sha256": ""}
    monkeypatch.setattr(export_mod, "load_model_at", lambda checkpoint: (None, state))
    monkeypatch.setattr("mnist_dist.data.load_for", lambda config: None)

    def rejected(work, *args):  # what _build leaves when a rule fails, without converting anything
        ownership.mark(work, "export")
        (work / "report.json").write_text('{"verified": false}')
        return {"verified": False, "rules": [{"rule": "fp32_argmax_agreement", "passed": False, "detail": "1 image"}]}

    monkeypatch.setattr(export_mod, "_build", rejected)
    query = f"?endpoint_override={s3[0].removeprefix('http://')}&scheme=http"
    lines = []
    export(run=run, out=f"s3://{BUCKET}/rejects/export{query}", log=lines.append)
    assert lines[-1].endswith(f"the rejected files are in s3://{BUCKET}/rejects/export.rejected{query}"), lines[-1]
    assert bucket_keys("rejects/") == ["rejects/export.rejected/.mnist-dist.json", "rejects/export.rejected/report.json"]


def test_a_saved_config_round_trips():
    config = TrainConfig(model="edge", epochs=3, augment=True, rotate=8.0)
    assert TrainConfig.from_saved(json.loads(json.dumps(config.to_dict()))) == config


def with_checkpoint_files(run):
    for name in ("model.keras", "state.json"):
        (run / "checkpoint_epoch001" / name).write_json({})


def test_a_teacher_is_settled_to_its_best_checkpoint_absolute_and_must_be_whole(tmp_path, monkeypatch):
    _config, big = finished_run(tmp_path, name="big")
    with_checkpoint_files(big)
    (tmp_path / "half" / "checkpoint_epoch001").mkdir(parents=True)  # a run that never finished: no best.json
    _config, pruned = finished_run(tmp_path, name="pruned")  # best.json names a checkpoint without its files
    monkeypatch.chdir(tmp_path)  # the workers have other working directories: the driver makes it absolute
    student = preset("smoke", storage="runs", name="small", teacher="big", **SMOKE)
    # Pinned to the checkpoint: a resume learns from the same weights even if the teacher trains on.
    assert rundir.settle(student).teacher == str(tmp_path / "big" / "checkpoint_epoch001")
    assert rundir.settle(student.replace(teacher="big/checkpoint_epoch001")).teacher == str(big / "checkpoint_epoch001")
    for teacher, named in (("nope", f"--teacher {tmp_path / 'nope'}: no such run folder"),
                           ("half", f"--teacher {tmp_path / 'half'}: not a finished run \\(it has no best.json\\)"),
                           ("pruned", f"--teacher {tmp_path / 'pruned' / 'checkpoint_epoch001'}: the checkpoint is not there whole"),
                           ("runs/small", f"--teacher {tmp_path / 'runs' / 'small'} is the run being trained"),
                           ("runs/small/checkpoint_epoch001", "--teacher .* is the run being trained")):
        with pytest.raises(RunError, match=rf"^{named}.*Fix: --teacher takes the --storage/--name folder"):
            rundir.settle(student.replace(teacher=teacher))


@pytest.mark.parametrize("change, named", [({"distill": 0.0}, r"--distill must be in \(0, 1\]"),
                                           ({"distill": 1.5}, r"--distill must be in \(0, 1\]"),
                                           ({"temperature": 0.0}, "--temperature must be > 0"),
                                           ({"temperature": math.nan}, "--temperature must be a finite number"),
                                           ({"teacher": ""}, "--teacher must not be empty")])
def test_distillation_settings_are_checked_in_one_line(change, named):
    with pytest.raises(ConfigError, match=named):
        TrainConfig(**change).validate()


def test_a_re_run_may_not_change_its_teacher(tmp_path):
    with_checkpoint_files(finished_run(tmp_path, name="big")[1])
    with_checkpoint_files(finished_run(tmp_path, name="other")[1])
    config, _run = finished_run(tmp_path, name="student", teacher=str(tmp_path / "big"))
    with pytest.raises(RunError, match="teacher="):
        rundir.claim(config.replace(epochs=2, teacher=str(tmp_path / "other")))


@pytest.mark.parametrize("change, named", [({"max_int4_drop_pp": -1.0}, "--max-int4-drop must be"),
                                           ({"max_int4_drop_pp": math.inf}, "--max-int4-drop must be"),
                                           ({"max_int8_drop_pp": 101.0}, "--max-int8-drop must be")])
def test_export_thresholds_name_their_flag(change, named):
    default = "0.2" if "int4" in named else "0.1"
    with pytest.raises(ExportError, match=rf"^{named} a finite number of percentage points.*Fix: pass e.g. \S+ {default} \(the default\)"):
        ExportOptions(**change).validate()


def test_the_int4_rule_counts_its_own_drop():
    from mnist_dist.export import accuracy_drop_rule

    assert accuracy_drop_rule("int4", {"tf_accuracy": 0.9635, "ort_accuracy": 0.9625}, 0.1)["passed"]
    rule = accuracy_drop_rule("int4", {"tf_accuracy": 0.9635, "ort_accuracy": 0.9624}, 0.1)
    assert rule["rule"] == "int4_accuracy_drop" and not rule["passed"] and "int4 accuracy 96.24%" in rule["detail"]


@pytest.mark.parametrize("command", ["train", "pipeline", "tune"])
def test_distillation_settings_without_a_teacher_are_refused_in_one_line(command):
    from mnist_dist.cli import build_parser, config_from_args

    args = build_parser().parse_args([command, "--distill", "0.9", "--temperature", "4"])
    with pytest.raises(ConfigError, match=r"^--distill and --temperature shape distillation, which needs a teacher. Fix: add --teacher"):
        config_from_args(args)
    args = build_parser().parse_args([command, "--teacher", "runs/big", "--distill", "0.5"])
    assert (config_from_args(args).distill, config_from_args(args).temperature) == (0.5, 4.0)  # the default temperature
