"""MLflow tracking and registry (`--mlflow`): a real `mlflow server` started here, with a
SQLite backend and its artifacts in a local folder or in the S3 test server, in a venv of
its own (scripts/lock/mlflow-server-*.txt: the server asks for a pyarrow Ray's environment
does not have). The project's side is the `mlflow` extra's client alone."""
import json
import os
import platform
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from conftest import BUCKET, ROOT, S3_CREDENTIALS, free_port, run_cli, tool_venv

SERVER_LOCK = ROOT / "scripts" / "lock" / f"mlflow-server-{platform.machine()}.txt"
PIPELINE = ("pipeline", "--preset", "smoke", "--in-process", "--epochs", "2", "--max-int8-drop", "5")


def start_server(tmp_path, artifacts: str, env: dict) -> tuple[str, subprocess.Popen]:
    venv = tool_venv(SERVER_LOCK, "mlflow-server")
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen([venv / "bin" / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", artifacts],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return uri, server
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()
            pytest.fail("the MLflow server did not answer:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
        time.sleep(0.5)


@pytest.fixture(autouse=True)
def no_mlflow_setting_left_behind():
    """The Tracker works through its own client: MLflow's global setters would leave
    MLFLOW_TRACKING_URI in os.environ, and every later command would log to that server."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == before


@pytest.fixture
def mlflow_server(s3, tmp_path):
    """(tracking URI, artifacts destination) of a fresh server with its artifacts in the S3 test
    server's bucket. (A server with a local artifact store: `local_server`, below.)"""
    endpoint, _ = s3
    env = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    artifacts = f"s3://{BUCKET}/mlflow-{tmp_path.name}"
    uri, server = start_server(tmp_path, artifacts, env)
    try:
        yield uri, artifacts
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow  # trains and exports
def test_a_pipeline_registers_its_verified_export_and_predict_pulls_it(mlflow_server, tmp_path, mnist_dir):
    from mlflow import MlflowClient

    mlflow_server, artifacts = mlflow_server
    storage = tmp_path / "runs"
    proc = run_cli(*PIPELINE, "--storage", storage, "--name", "reg", "--mlflow", mlflow_server, "--mlflow-model", "digits")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mlflow: registered digits version 1 (models:/digits/1)" in proc.stdout, proc.stdout[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist-dist").experiment_id])
    assert run.info.run_name == "reg" and run.info.status == "FINISHED"
    assert run.data.params["model"] == "lenet5" and run.data.params["epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    result = json.loads((storage / "reg" / "result.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    # The version: the export's files, report.md as its description, the verification as tags.
    (version,) = client.search_model_versions("name='digits'")
    report = json.loads((storage / "reg" / "export" / "report.json").read_text())
    assert version.version == "1" and version.run_id == run.info.run_id
    assert version.tags["verified"] == "true" and version.tags["fp32.sha256"] == report["fp32"]["sha256"]
    assert version.tags["int8.test_accuracy"] == f"{report['int8']['ort_accuracy']:.4f}"
    assert "must be 0" in version.tags["rule.fp32_argmax_agreement"]
    assert version.description == (storage / "reg" / "export" / "report.md").read_text()
    print(f"\nMLflow lists digits version {version.version}: source {version.source}, status {version.status}, tags {version.tags}")
    folder = f"export/{report['fp32']['sha256'][:12]}"  # each export in a folder of its own
    assert version.source == f"runs:/{run.info.run_id}/{folder}"
    files = {f.path for f in client.list_artifacts(run.info.run_id, folder)}
    assert {f"{folder}/{name}" for name in ("model.onnx", "model.int8.onnx", "report.json", "report.md")} <= files
    from conftest import bucket_keys  # where the server keeps them: the bucket

    stored = bucket_keys(artifacts.split("/", 3)[3] + "/")
    assert any(key.endswith(f"{folder}/model.onnx") for key in stored), stored[:20]

    # A device pulls the version by name and classifies with it, as with a local export.
    from mnist_edge import idx

    images = idx.read(mnist_dir / "t10k-images-idx3-ubyte.gz")[:8]
    np.save(tmp_path / "eight.npy", images)
    pulled = run_cli("predict", "--model", "models:/digits/1", "--mlflow", mlflow_server, "--json", tmp_path / "eight.npy")
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]
    local = run_cli("predict", "--model", storage / "reg" / "export", "--json", tmp_path / "eight.npy")
    assert [r["label"] for r in json.loads(pulled.stdout)["predictions"]] == [r["label"] for r in json.loads(local.stdout)["predictions"]]

    # Run again: nothing new to train or export, and nothing logged twice.
    again = run_cli(*PIPELINE, "--storage", storage, "--name", "reg", "--mlflow", mlflow_server, "--mlflow-model", "digits")
    assert again.returncode == 0 and "already digits version 1" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(client.search_model_versions("name='digits'")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1


@pytest.mark.slow  # trains and exports
def test_an_export_that_fails_verification_is_never_registered(local_server, tmp_path):
    from mlflow import MlflowClient

    proc = run_cli(*PIPELINE, "--epochs", "1", "--synthetic", "--storage", tmp_path / "runs", "--name", "bad",
                   "--tolerance", "0", "--mlflow", local_server, "--mlflow-model", "never")  # the fp32 rule must fail
    assert proc.returncode == 1 and "FAILED rule fp32_logit_tolerance" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing is registered" in proc.stdout
    client = MlflowClient(local_server)
    assert client.search_model_versions("name='never'") == []
    logged = client.search_runs([client.get_experiment_by_name("mnist-dist").experiment_id], "attributes.run_name = 'bad'")
    assert len(logged) == 1  # the run itself is on record


def test_a_server_that_does_not_answer_is_one_line_before_any_training(tmp_path, capsys):
    from mnist_dist import cli

    started = time.monotonic()
    code = cli.main(["train", "--preset", "smoke", "--in-process", "--storage", str(tmp_path), "--name", "x",
                     "--mlflow", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --mlflow http://127.0.0.1:") and "does not answer" in line and "Fix: " in line, line
    assert not (tmp_path / "x").exists() and time.monotonic() - started < 30  # nothing trained, no retries waited out


def test_without_the_client_mlflow_is_one_line_and_nothing_else_needs_it(monkeypatch):
    import sys

    from mnist_dist import tracking
    from mnist_dist.config import ConfigError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as where the mlflow extra is not installed
    with pytest.raises(ConfigError, match=r"pip install \"mnist-dist\[mlflow\]\""):
        tracking.Tracker("http://127.0.0.1:1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None) is None  # without the flag or the variable, nothing is logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri(None) == "http://mlflow:5000" and tracking.tracking_uri("http://a:1") == "http://a:1"


def test_predict_of_a_registered_model_without_a_server_is_one_line(monkeypatch, capsys):
    from mnist_dist import cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["predict", "--model", "models:/digits/1", "x.npy"]) == 2
    err = capsys.readouterr().err
    assert "no server is named" in err and "Fix: --mlflow URI" in err and "Traceback" not in err


def test_the_verification_figures_become_the_versions_tags():
    report = {"checkpoint": "checkpoint_epoch002", "model": "lenet5", "test_images": 10000,
              "rules": [{"rule": "fp32_logit_tolerance", "passed": True, "detail": "max |logit difference| 7.6e-06 (must be <= 0.0001)"}],
              **{p: {"ort_accuracy": 0.98765, "sha256": p * 4, "size_bytes": 1234, "argmax_disagreements": 3,
                     "max_abs_logit_diff": 2.05e-3} for p in ("fp32", "int8")}}
    from mnist_dist.tracking import verification_tags

    tags = verification_tags(report)
    assert tags["verified"] == "true" and tags["checkpoint"] == "checkpoint_epoch002" and tags["test_images"] == "10000"
    assert tags["int8.test_accuracy"] == "0.9877" and tags["fp32.sha256"] == "fp32" * 4 and tags["int8.size_bytes"] == "1234"
    assert tags["rule.fp32_logit_tolerance"].startswith("max |logit difference|")
    assert all(isinstance(v, str) for v in tags.values())  # MLflow's tags are strings
    assert not any(key.startswith("int4.") for key in tags)
    with_int4 = verification_tags({**report, "int4": {**report["int8"], "sha256": "int4" * 4, "size_bytes": 777}})
    assert with_int4["int4.sha256"] == "int4" * 4 and with_int4["int4.size_bytes"] == "777"  # what fetch checks it by


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """One server with its artifacts in a folder, for the tests that log files of their own making."""
    home = tmp_path_factory.mktemp("mlflow")
    uri, server = start_server(home, str(home / "artifacts"), {})
    try:
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def fake_export(folder, model: bytes):
    """An export's files, and its report, as far as the registry reads them."""
    import hashlib

    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model)
    (folder / "model.int8.onnx").write_bytes(model)  # the same figures (and digest) as model.onnx, below
    (folder / "report.md").write_text(f"# export of {model!r}\n")
    figures = {"ort_accuracy": 0.99, "sha256": hashlib.sha256(model).hexdigest(), "size_bytes": len(model),
               "argmax_disagreements": 0, "max_abs_logit_diff": 1e-6}
    return {"verified": True, "checkpoint": "checkpoint_epoch001", "model": "lenet5", "test_images": 10000, "rules": [],
            "fp32": figures, "int8": figures}


@pytest.mark.slow  # a server
def test_a_later_export_of_the_run_is_a_new_version_and_leaves_the_first_ones_files(local_server, tmp_path):
    from mnist_dist import tracking
    from mnist_dist.errors import RunError
    from mnist_dist.store import Location

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"config": {"model": "lenet5"}, "epochs_completed": 1,
                                                 "history": [{"epoch": 1, "val_accuracy": 0.9, "finished_at": 1.8e9}]}))
    tracker = tracking.Tracker(local_server, "versions", log=lambda _: None)
    first = tracker.register(Location.of(run), Location.of(tmp_path / "one"), fake_export(tmp_path / "one", b"first"))
    second = tracker.register(Location.of(run), Location.of(tmp_path / "two"), fake_export(tmp_path / "two", b"second"))
    assert (first, second) == ("1", "2")
    assert tracker.register(Location.of(run), Location.of(tmp_path / "two"), fake_export(tmp_path / "again", b"second")) == "2"
    assert (tracker.fetch("models:/versions/1", tmp_path / "pulled-1") / "model.onnx").read_bytes() == b"first"
    assert (tracker.fetch("models:/versions/2", tmp_path / "pulled-2") / "model.onnx").read_bytes() == b"second"
    # By an alias, and as a copy (MLflow's promotion: its source is the version it copied).
    from mlflow import MlflowClient

    MlflowClient(local_server).set_registered_model_alias("versions", "production", "2")
    assert (tracker.fetch("models:/versions@production", tmp_path / "by-alias") / "model.onnx").read_bytes() == b"second"
    MlflowClient(local_server).copy_model_version("models:/versions/1", "promoted")
    assert (tracker.fetch("models:/promoted/1", tmp_path / "copied") / "model.onnx").read_bytes() == b"first"
    # Under another model name, the same export is a version of that model.
    assert tracking.Tracker(local_server, "other", log=lambda _: None).register(
        Location.of(run), Location.of(tmp_path / "one"), fake_export(tmp_path / "three", b"first")) == "1"
    # Files that are not the registered export (replaced by hand in the store) are refused.
    from mlflow import MlflowClient

    MlflowClient(local_server).set_model_version_tag("versions", "1", "fp32.sha256", "0" * 64)
    with pytest.raises(RunError, match="not the export registered as that version"):
        tracker.fetch("models:/versions/1", tmp_path / "pulled-3")


@pytest.mark.slow  # a server
def test_a_sweep_is_one_run_with_a_child_per_trial_and_is_logged_once(local_server, tmp_path):
    """The sweep's record from its files (no Ray here): a finished trial with its epochs, one
    ASHA stopped with what it reached; logged again, nothing doubles."""
    from mlflow import MlflowClient

    from mnist_dist import tracking
    from mnist_dist.store import Location

    folder = tmp_path / "sweeps" / "lr"
    history = [{"epoch": e, "val_accuracy": 0.5 + e / 10, "val_loss": 1.0 / e, "finished_at": 1.8e9 + e} for e in (1, 2)]
    (folder / "trial-00000").mkdir(parents=True)
    (folder / "trial-00000" / "result.json").write_text(json.dumps(
        {"config": {"learning_rate": 0.05, "model": "lenet5"}, "history": history, "epochs_completed": 2,
         "test_accuracy": 0.69, "test_loss": 0.9, "best_val_accuracy": 0.7, "best_epoch": 2}))
    (folder / "trial-00001").mkdir()
    record = {"status": "finished", "sweep": {"space": {"learning_rate": {"choices": [0.05, 0.0005, 0.5]}}},
              "base": {"epochs": 2, "model": "lenet5"}, "metric": "val_accuracy",
              "trials": [{"name": "trial-00000", "params": {"learning_rate": 0.05}, "status": "finished", "epochs": 2,
                          "best_val_accuracy": 0.7, "run": str(folder / "trial-00000")},
                         {"name": "trial-00001", "params": {"learning_rate": 0.0005}, "status": "stopped early", "epochs": 1,
                          "best_val_accuracy": 0.1, "run": str(folder / "trial-00001")},
                         {"name": "trial-00002", "params": {"learning_rate": 0.5}, "status": "error", "epochs": 0,
                          "best_val_accuracy": None, "run": str(folder / "trial-00002")}],
              "best": {"name": "trial-00000", "best_val_accuracy": 0.7}}
    tracker = tracking.Tracker(local_server, log=lambda _: None)
    parent = tracker.record_sweep(Location.of(folder), record)
    assert tracker.record_sweep(Location.of(folder), record) == parent  # again: the same run, nothing new
    client = MlflowClient(local_server)
    runs = client.search_runs([client.get_experiment_by_name("mnist-dist").experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert [r.info.run_name for r in runs].count("lr") == 1 and len(children) == 3, [r.info.run_name for r in runs]
    assert client.get_run(parent).data.tags["mnist_dist.best_trial"] == "trial-00000"
    finished, stopped, failed = children["trial-00000"], children["trial-00001"], children["trial-00002"]
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "val_accuracy")] == [1, 2]
    assert finished.data.metrics["test_accuracy"] == 0.69 and finished.data.params["learning_rate"] == "0.05"
    assert stopped.info.status == "KILLED" and stopped.data.metrics["best_val_accuracy"] == 0.1
    assert failed.info.status == "FAILED"  # a trial that left no folder is on record too, once


def test_a_tracking_uri_mlflow_refuses_outright_is_one_line(tmp_path, capsys):
    """MLflow 3 refuses a local file store (`--mlflow ./mlruns`) when the client is made."""
    from mnist_dist import cli

    code = cli.main(["predict", "--model", "models:/digits/1", "--mlflow", str(tmp_path / "mlruns"), str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: --mlflow {tmp_path / 'mlruns'}: ") and "Fix: " in line, line
