"""Runs in a bucket: a real S3-compatible HTTP server (moto's server mode), real Ray, real exports.

Checkpoints, config.json, result.json, best.json, the verified export and the report must
all land in the bucket, a resume must read them from there, and nothing may be written to
the working directory. The endpoint is given both standard ways: AWS_ENDPOINT_URL, and
pyarrow's `?endpoint_override=` in the URI.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import BUCKET, ROOT, bucket_keys, free_port, run_cli

def keys(prefix: str) -> list[str]:
    return bucket_keys(prefix)


def read(key: str) -> dict:
    import boto3

    return json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())


def last_line(proc) -> str:
    return (proc.stdout + proc.stderr).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bucket_run(s3, tmp_path_factory):
    """`train` for 1 epoch, then `pipeline` to 2 epochs (a resume from the bucket), from an empty folder."""
    _endpoint, env = s3
    cwd = tmp_path_factory.mktemp("cwd")
    storage = f"s3://{BUCKET}/runs"
    common = ["--preset", "smoke", "--storage", storage, "--name", "first", "--train-limit", "1024"]
    trained = run_cli("train", *common, "--epochs", "1", env=env, cwd=cwd)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    after_one = keys("runs/first/")
    resumed = run_cli("pipeline", *common, "--epochs", "2", env=env, cwd=cwd)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {"storage": storage, "run": f"{storage}/first", "common": common, "cwd": cwd, "env": env,
            "after_one": after_one, "trained": trained, "resumed": resumed}


@pytest.mark.slow
def test_a_run_lands_whole_in_the_bucket_and_nothing_in_the_working_directory(bucket_run):
    assert list(bucket_run["cwd"].iterdir()) == []
    assert "runs/first/checkpoint_epoch001/model.keras" in bucket_run["after_one"]
    assert "runs/first/result.json" in bucket_run["after_one"]
    names = keys("runs/first/")
    for key in ("config.json", "result.json", "best.json", "checkpoint_epoch002/model.keras", "checkpoint_epoch002/state.json",
                "export/model.onnx", "export/model.int8.onnx", "export/report.json", "export/.mnist-dist.json",
                "checkpoint_manager_snapshot.json"):
        assert f"runs/first/{key}" in names, names
    assert "runs/first/.lock" not in names  # the run's lock is released at the end
    events = [n for n in names if n.startswith("runs/first/tensorboard/events.out.tfevents.")]
    assert len(events) == 2, names  # one per command that trained: `train`, then the resuming `pipeline`
    result = read("runs/first/result.json")
    assert result["run_dir"] == bucket_run["run"]
    assert result["best_checkpoint"].startswith(bucket_run["run"] + "/checkpoint_epoch00")
    assert read("runs/first/export/report.json")["verified"] is True


@pytest.mark.slow
def test_a_resume_reads_its_checkpoint_from_the_bucket_and_trains_each_epoch_once(bucket_run):
    out = bucket_run["resumed"].stdout + bucket_run["resumed"].stderr
    assert "resum" in out.lower(), out
    history = read("runs/first/result.json")["history"]
    assert [m["epoch"] for m in history] == [1, 2]
    assert read("runs/first/result.json")["epochs_completed"] == 2


@pytest.mark.slow
def test_a_rerun_in_the_bucket_trains_and_exports_nothing(bucket_run):
    proc = run_cli("pipeline", *bucket_run["common"], "--epochs", "2", env=bucket_run["env"], cwd=bucket_run["cwd"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to train" in proc.stdout and "nothing to export" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_report_and_predict_with_the_endpoint_in_the_uri(bucket_run, s3, mnist_dir):
    endpoint, env = s3
    host = endpoint.removeprefix("http://")
    env = {**env, "AWS_ENDPOINT_URL": ""}  # only the URI's query names the server now
    query = f"?endpoint_override={host}&scheme=http"
    proc = run_cli("report", "--run", bucket_run["run"] + query, env=env, cwd=bucket_run["cwd"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"runs/first/report/report.md", "runs/first/report/curves.png"} <= set(keys("runs/first/report/"))
    assert "no TensorBoard events" not in proc.stdout  # the step curves come from the bucket's events
    proc = run_cli("predict", "--model", f"{bucket_run['run']}/export{query}", "--json",
                   str(mnist_dir / "t10k-images-idx3-ubyte.gz"), env=env, cwd=bucket_run["cwd"])
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)
    assert len(predictions["predictions"] if isinstance(predictions, dict) else predictions) == 10000
    assert list(bucket_run["cwd"].iterdir()) == []


@pytest.mark.slow
def test_export_in_the_bucket_refuses_what_it_did_not_make(bucket_run):
    import boto3

    run, env, cwd = bucket_run["run"], bucket_run["env"], bucket_run["cwd"]
    proc = run_cli("export", "--run", run, env=env, cwd=cwd)
    assert proc.returncode == 2 and "holds a previous verified export" in last_line(proc), last_line(proc)
    proc = run_cli("export", "--run", run, "--out", run, "--force", env=env, cwd=cwd)
    assert proc.returncode == 2 and "is or contains" in last_line(proc), last_line(proc)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="mine/notes.txt", Body=b"my notes")
    proc = run_cli("export", "--run", run, "--out", f"s3://{BUCKET}/mine", "--force", env=env, cwd=cwd)
    assert proc.returncode == 2 and "did not write" in last_line(proc), last_line(proc)
    assert keys("mine/") == ["mine/notes.txt"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_cut_off_upload_is_never_taken_for_a_finished_export(bucket_run, tmp_path):
    """An export prefix without its report.json (the commit record) is not published, and is replaceable."""
    import boto3

    from mnist_dist.export import published
    from mnist_dist.store import Location

    client, run = boto3.client("s3"), bucket_run["run"]
    for key in keys("runs/first/export/"):
        client.copy_object(Bucket=BUCKET, Key=key.replace("/export/", "/half/"), CopySource={"Bucket": BUCKET, "Key": key})
    client.delete_object(Bucket=BUCKET, Key="runs/first/half/report.json")
    assert published(Location.of(f"{run}/half")) is None
    assert published(Location.of(f"{run}/export"))["verified"] is True
    proc = run_cli("export", "--run", run, "--out", f"{run}/half", env=bucket_run["env"], cwd=bucket_run["cwd"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read("runs/first/half/report.json")["verified"] is True


@pytest.mark.parametrize("storage, expected", [
    ("s3://no-such-bucket/runs", "bucket no-such-bucket does not exist"),
    ("nosuchscheme://x/runs", "not a storage URI that pyarrow.fs can open"),
])
def test_a_bad_bucket_fails_in_seconds_with_one_line(s3, tmp_path, storage, expected):
    started = time.time()
    proc = run_cli("train", "--preset", "smoke", "--storage", storage, "--name", "x", env=s3[1], cwd=tmp_path)
    assert proc.returncode == 2 and expected in last_line(proc), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and time.time() - started < 30
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_endpoint_fails_with_one_line(s3, tmp_path):
    env = {**s3[1], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    proc = run_cli("train", "--preset", "smoke", "--storage", f"s3://{BUCKET}/runs", "--name", "x", env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Fix: check the bucket name, the credentials" in last_line(proc), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_prefix_of_other_objects_is_never_trained_into(s3, tmp_path):
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="photos/cat.jpg", Body=b"...")
    proc = run_cli("train", "--preset", "smoke", "--storage", f"s3://{BUCKET}", "--name", "photos", env=s3[1], cwd=tmp_path)
    assert proc.returncode == 2 and "holds files (cat.jpg) but no run of mnist-dist" in last_line(proc), proc.stderr
    assert keys("photos/") == ["photos/cat.jpg"]


@pytest.mark.slow
def test_in_process_training_writes_its_run_into_the_bucket(s3, tmp_path):
    proc = run_cli("train", "--in-process", "--preset", "smoke", "--storage", f"s3://{BUCKET}/local", "--name", "one",
                   "--train-limit", "1024", "--epochs", "1", env=s3[1], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = keys("local/one/")
    for key in ("config.json", "result.json", "best.json", "checkpoint_epoch001/model.keras",
                "checkpoint_epoch001/state.json", "checkpoint_epoch001/.mnist-dist.json"):
        assert f"local/one/{key}" in names, names
    assert any(n.startswith("local/one/tensorboard/events.out.tfevents.") for n in names), names
    assert list(tmp_path.iterdir()) == []
    # A teacher in the bucket: pinned to its best checkpoint there, read from there.
    proc = run_cli("train", "--in-process", "--preset", "smoke", "--storage", f"s3://{BUCKET}/local", "--name", "student",
                   "--teacher", f"s3://{BUCKET}/local/one", "--train-limit", "1024", "--epochs", "1", env=s3[1], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"teacher: lenet5 of s3://{BUCKET}/local/one/checkpoint_epoch001 (epoch 1" in proc.stdout
    assert read("local/student/config.json")["teacher"] == f"s3://{BUCKET}/local/one/checkpoint_epoch001"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_keys_from_the_kubernetes_secret_file_alone_reach_the_bucket(tmp_path):
    """k8s/components/object-store mounts the Secret's `credentials` file and points
    AWS_SHARED_CREDENTIALS_FILE at it, with no keys in the environment. Here a moto server that
    checks signatures (INITIAL_NO_AUTH_ACTION_COUNT: only the set-up calls go unchecked) serves
    the bucket: the store reaches it with the file's keys, and is refused without them."""
    import subprocess
    import sys

    import boto3
    from helpers.kuberay_local import render

    config = next(d for d in render(ROOT / "k8s" / "overlays" / "s3") if d["kind"] == "ConfigMap")["data"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "set-up", "aws_secret_access_key": "set-up"}
        deadline = time.time() + 30
        while True:
            try:
                iam = boto3.client("iam", **admin)
                iam.create_user(UserName="mnist-dist")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        key = iam.create_access_key(UserName="mnist-dist")["AccessKey"]
        iam.put_user_policy(UserName="mnist-dist", PolicyName="bucket", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **admin).create_bucket(Bucket="keys")  # the 4th and last unchecked call
        # The file as `kubectl create secret generic mnist-s3-credentials --from-file=credentials=...` mounts it.
        mounted = tmp_path / Path(config["AWS_SHARED_CREDENTIALS_FILE"]).relative_to("/")
        mounted.parent.mkdir(parents=True)
        mounted.write_text(f"[default]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE=str(mounted))
        probe = ("from mnist_dist.store import Location; run = Location.of('s3://keys/runs'); run.check_reachable(); "
                 "(run / 'probe.json').write_json({'ok': 1}); print((run / 'probe.json').read_json())")
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "{'ok': 1}", proc.stdout + proc.stderr
        mounted.unlink()  # no Secret: the optional volume is empty, and the store has no keys
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, proc.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
