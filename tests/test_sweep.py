"""`mnist-dist tune` (mnist_dist.sweep): the space's rules in this process, and a real ASHA sweep
of Ray Train runs on the embedded local Ray into the S3 test server, its re-run, and the export
of its best trial."""
import json

import pytest

from conftest import run_cli
from mnist_dist import sweep
from mnist_dist.cli import TRAIN_OPTIONS
from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.errors import RunError
from mnist_dist.store import Location

NAMES = {flag.lstrip("-"): field for flag, (field, _k, _h) in TRAIN_OPTIONS.items()} | {"augment": "augment"}
KINDS = {field: kind for _flag, (field, kind, _h) in TRAIN_OPTIONS.items()} | {"augment": bool}


def space(*entries, text=None):
    return sweep.parse_space(list(entries), text, NAMES, KINDS, TrainConfig())


def test_choices_and_ranges_from_the_command_line_and_a_yaml_file_become_fields_with_their_types():
    dims = space("lr=0.01,0.05", "batch-size=32,64", "augment=true,false", "l2=loguniform:1e-5:1e-3")
    assert dims == (sweep.Dimension("learning_rate", choices=(0.01, 0.05)), sweep.Dimension("batch_size", choices=(32, 64)),
                    sweep.Dimension("augment", choices=(True, False)),
                    sweep.Dimension("l2", sampler="loguniform", low=1e-5, high=1e-3))
    assert sweep.Sweep(dims, samples=3).trials == 3 * 2 * 2 * 2
    from_file = space(text="model: [lenet5, cnn-bn]\nlr: {uniform: [0.01, 0.1]}\n")
    assert from_file == (sweep.Dimension("model", choices=("lenet5", "cnn-bn")),
                         sweep.Dimension("learning_rate", sampler="uniform", low=0.01, high=0.1))
    assert sweep.Sweep(from_file).to_dict()["space"] == {"model": "lenet5,cnn-bn", "learning_rate": "uniform:0.01:0.1"}
    distilled = sweep.parse_space(["distill=0.5,0.9", "temperature=uniform:2:6"], None, NAMES, KINDS,
                                  TrainConfig(teacher="/runs/big"))
    assert distilled == (sweep.Dimension("distill", choices=(0.5, 0.9)),
                         sweep.Dimension("temperature", sampler="uniform", low=2.0, high=6.0))
    with pytest.raises(ConfigError, match=r"^--space distill=1.5: --distill must be in \(0, 1\]"):
        sweep.parse_space(["distill=1.5"], None, NAMES, KINDS, TrainConfig(teacher="/runs/big"))


@pytest.mark.parametrize("entries, text, message", [
    ((), None, "tune needs a space to search. Fix: --space lr=0.01,0.05"),
    (("lr",), None, "--space 'lr' is not KEY=VALUES. Fix: "),
    (("storage=a,b",), None, "--space storage: not an option a sweep can vary. Fix: one of augment, batch-size"),
    (("workers=1,2",), None, "--space workers: not an option a sweep can vary"),
    (("lr=0.01,abc",), None, "--space lr: 'abc' is not a float"),
    (("lr=-1,0.1",), None, "--space lr=-1.0: --lr must be > 0, got -1.0"),
    (("model=lenet5,nope",), None, "--space model=nope: unknown model 'nope'"),
    (("lr=0.01,0.01",), None, "--space lr: a value is listed twice"),
    (("lr=loguniform:0.1:0.01",), None, "--space lr: loguniform needs 0 < LOW < HIGH"),
    (("lr=uniform:0.1",), None, "--space lr=uniform:0.1: a range is uniform:LOW:HIGH"),
    (("batch-size=uniform:16:64",), None, "--space batch-size: only a number with decimals takes a range"),
    (("augment=maybe",), None, "--space augment: 'maybe' is not a bool"),
    ((), "lr: [0.01", "--space-file is not YAML"),
    ((), "- lr", "--space-file must be a YAML mapping"),
    ((), "lr: {normal: [0, 1]}", "--space lr: a range is {uniform: [LOW, HIGH]} or {loguniform: [LOW, HIGH]}"),
    (("distill=0.5,0.9",), None, "--space distill: shapes distillation, which needs a teacher. Fix: add --teacher RUN"),
])
def test_a_bad_space_is_one_line_naming_the_fix(entries, text, message):
    with pytest.raises(ConfigError) as raised:
        space(*entries, text=text)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def trial(name, status, epochs, best):
    return {"name": name, "params": {"learning_rate": 0.01}, "status": status, "epochs": epochs, "best_val_accuracy": best}


def test_the_best_trial_is_the_most_accurate_that_trained_every_epoch():
    trials = [trial("trial-00000", "finished", 3, 0.90), trial("trial-00001", "stopped early", 1, 0.99),
              trial("trial-00002", "finished", 3, 0.95), trial("trial-00003", "error", 2, 0.97),
              trial("trial-00004", "finished", 3, 0.95)]
    assert sweep.summarize(trials, epochs=3)["name"] == "trial-00002"  # a tie goes to the earlier trial
    assert sweep.summarize(trials[1:2], epochs=3) is None


def test_a_sweep_is_never_written_into_a_folder_of_other_files_and_an_unfinished_one_has_no_best(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("x")
    with pytest.raises(RunError, match="holds files .*cat.jpg.* but no sweep of mnist-dist"):
        sweep.check_is_sweep_or_new(Location.of(tmp_path / "photos"))
    sweep.check_is_sweep_or_new(Location.of(tmp_path / "new"))
    with pytest.raises(RunError, match="no sweep there"):
        sweep.load(str(tmp_path), "new")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep.TUNE_FILE).write_text(json.dumps({"status": "running"}))
    with pytest.raises(RunError, match="not finished, so it has no best trial yet. Fix: run the same mnist-dist tune"):
        sweep.load(str(tmp_path), "s")


def test_the_best_trials_config_is_the_base_with_its_values_in_the_sweeps_folder(tmp_path):
    base = {k: v for k, v in TrainConfig(epochs=3).to_dict().items() if k not in ("name", "storage")}
    best = {**trial("trial-00002", "finished", 3, 0.95), "params": {"learning_rate": 0.05, "batch_size": 32}}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep.TUNE_FILE).write_text(json.dumps({"status": "finished", "base": base, "best": best}))
    config = sweep.best_config(str(tmp_path), "s")
    assert (config.learning_rate, config.batch_size, config.epochs) == (0.05, 32, 3)
    assert (config.storage, config.name) == (str(tmp_path / "s"), "trial-00002")


@pytest.mark.slow  # starts Ray and trains
def test_a_sweep_of_four_trials_with_asha_in_a_bucket_records_each_and_exports_the_best(s3, tmp_path):
    """On the embedded local Ray, into the S3 test server: tune.json, each trial's run and Tune's
    state in the bucket, nothing in the working directory; run again, nothing runs; the best
    trial exported there. (A sweep into a local folder: tests/test_cluster.py.)"""
    import boto3

    from conftest import BUCKET

    _endpoint, env = s3
    common = ["--preset", "smoke", "--workers", "1", "--epochs", "3", "--train-limit", "1024", "--val-size", "500",
              "--eval-every", "16", "--storage", f"s3://{BUCKET}/sweeps"]
    args = ["tune", *common, "--name", "s", "--space", "lr=0.05,0.0005", "--space", "batch-size=32,64"]
    proc = run_cli(*args, env=env, cwd=tmp_path, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert list(tmp_path.iterdir()) == []

    def read(key):
        return json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=f"sweeps/s/{key}")["Body"].read())
    record = read(sweep.TUNE_FILE)
    trials = record["trials"]
    assert record["status"] == "finished" and [t["name"] for t in trials] == [f"trial-{i:05d}" for i in range(4)]
    assert sorted((t["params"]["learning_rate"], t["params"]["batch_size"]) for t in trials) == [
        (0.0005, 32), (0.0005, 64), (0.05, 32), (0.05, 64)]
    assert all(t["status"] in ("finished", "stopped early") for t in trials), trials
    assert any(t["status"] == "stopped early" and t["epochs"] < 3 for t in trials), trials  # ASHA ended a poor one
    best = record["best"]
    assert best["status"] == "finished" and best["params"]["learning_rate"] == 0.05, trials
    assert best["best_val_accuracy"] == max(t["best_val_accuracy"] for t in trials if t["epochs"] == 3)
    result = read(f"{best['name']}/result.json")  # each trial is a run of its own
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3] and best["test_accuracy"] == result["test_accuracy"]
    assert f"best: {best['name']} (learning_rate=0.05, batch_size=" in out
    table = out[out.index("\ntrial "):].splitlines()[1:7]  # the sweep's own table and its best line
    print("\n" + "\n".join(table))

    again = run_cli(*args, env=env, cwd=tmp_path)  # finished: nothing to run
    assert again.returncode == 0 and "is finished: nothing to run" in again.stdout, again.stdout + again.stderr
    other = run_cli("tune", *common, "--name", "s", "--space", "lr=0.01,0.05", env=env, cwd=tmp_path)
    assert other.returncode == 2 and "a sweep of another space or other train options is there" in other.stderr

    exported = run_cli("pipeline", *common, "--from-tune", "s", "--max-int8-drop", "5", env=env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert read(f"{best['name']}/export/report.json")["verified"] is True
    assert list(tmp_path.iterdir()) == []
