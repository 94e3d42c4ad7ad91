import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Absolute, as README.md's relative `export MNIST_DATA_DIR=../shared/data/mnist` is not: the
# tests hand it to subprocesses in other working directories and build file:// URLs from it.
MNIST_DIR = Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist")).resolve()
# Every test (and every subprocess it starts) reads the real MNIST from here.
os.environ["MNIST_DATA_DIR"] = str(MNIST_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Ray's token authentication on, for every Ray the tests start or join (the embedded local
# Ray, `ray start` clusters, the multi-node cluster) and every client of theirs: one token
# for the session, as a user's ~/.ray/auth_token would be.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if os.environ["RAY_AUTH_MODE"] == "token":
    import secrets

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `mnist-dist ARGS` in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "mnist_dist.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built the way `pip install .` and the image build it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (built,) = out.glob("mnist_dist-*.whl")
    return built


def tool_venv(lock_file: Path, prefix: str) -> Path:
    """A venv of its own for a tool the project's environment must not hold (the bench peers,
    the MLflow server), made from its hashed lock and kept in the user's cache by the lock's
    hash. A partial one is never taken for a made one. Compiled to bytecode, as pip installs:
    where PYTHONDONTWRITEBYTECODE is set, a process that compiles its imports from source
    starts some 2x slower. Returns the venv's folder."""
    import hashlib

    import uv

    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-dist" / (
        f"{prefix}-" + hashlib.sha256(lock_file.read_bytes() + b"compiled").hexdigest()[:12])
    if not (home / "ready").exists():
        partial = home.with_name(f"{home.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run([uv.find_uv_bin(), "venv", "-q", "--python", sys.executable, str(partial)], check=True, timeout=300)
        # Installed where it runs: a venv's scripts name their own path.
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)
        subprocess.run([uv.find_uv_bin(), "pip", "install", "-q", "--compile-bytecode", "--python", str(home / "bin" / "python"),
                        "--require-hashes", "-r", str(lock_file)], check=True, timeout=900)
        check = subprocess.run([uv.find_uv_bin(), "pip", "check", "--python", str(home / "bin" / "python")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        (home / "ready").write_text(lock_file.read_text())
    return home


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"real MNIST not found at {MNIST_DIR}; set MNIST_DATA_DIR")
    return MNIST_DIR


@pytest.fixture(scope="session")
def ray_run(tmp_path_factory, mnist_dir):
    """One real 2-worker Ray Train run on a real-MNIST subset, shared by the tests that inspect a run."""
    storage = tmp_path_factory.mktemp("runs")
    # The probe logs every process that imports TensorFlow: it should be the workers alone.
    import_log = tmp_path_factory.mktemp("tensorflow-imports")
    probe = str(ROOT / "tests" / "helpers" / "import_probe")
    pids = tmp_path_factory.mktemp("worker-pids")  # each rank writes rank<R>.pid (launcher.PID_DIR_ENV)
    env = {"MNIST_DIST_IMPORT_LOG": str(import_log), "MNIST_DIST_PID_DIR": str(pids),
           "PYTHONPATH": os.pathsep.join(filter(None, [probe, os.environ.get("PYTHONPATH")]))}
    proc = run_cli("train", "--preset", "smoke", "--model", "tf-tutorial", "--workers", "2", "--batch-size", "32",
                   "--train-limit", "4096", "--val-size", "1000", "--epochs", "2", "--lr", "0.05", "--eval-every", "20",
                   "--storage", storage, "--name", "e2e", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = storage / "e2e"
    return {"run_dir": run_dir, "stdout": proc.stdout, "stderr": proc.stderr, "import_log": import_log, "pids": pids,
            "result": json.loads((run_dir / "result.json").read_text())}


@pytest.fixture(scope="session")
def exported(ray_run):
    """The verified export of the shared Ray run: the whole real path, train -> export -> verify."""
    proc = run_cli("export", "--run", ray_run["run_dir"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": ray_run["run_dir"] / "export", "stdout": proc.stdout}


@pytest.fixture(scope="session")
def edge_export(tmp_path_factory, mnist_dir):
    """A verified export of the device model (`edge`) with its int4 file, trained for a few seconds in one process."""
    storage = tmp_path_factory.mktemp("edge")
    proc = run_cli("pipeline", "--in-process", "--preset", "smoke", "--model", "edge", "--storage", storage, "--name", "edge",
                   "--int4", "--max-int8-drop", "5", "--max-int4-drop", "5")  # about the files, not the accuracy of 2 short epochs
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "edge" / "export"


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, mnist_dir):
    """A quick in-process run (no Ray) for export error cases."""
    from mnist_dist.config import TrainConfig
    from mnist_dist import training

    storage = tmp_path_factory.mktemp("small")
    config = TrainConfig(model="lenet5", epochs=1, batch_size=64, optimizer="sgd", learning_rate=0.05, train_limit=6400, val_size=1000,
                         eval_every=1000, storage=str(storage), name="small", data_dir=str(mnist_dir))
    training.run(config, in_process=True, log=lambda _: None)
    return storage / "small"


BUCKET = "mnist-runs"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """(endpoint URL, env for commands) of a real S3-compatible server (moto's server mode) with
    one bucket, BUCKET; this process's own pyarrow and boto3 calls reach it too."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield endpoint, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bucket_keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
