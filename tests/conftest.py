import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist"))
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
def small_run(tmp_path_factory, mnist_dir):
    """A quick in-process run (no Ray) for export error cases."""
    from mnist_dist.config import TrainConfig
    from mnist_dist.local import train_in_process

    storage = tmp_path_factory.mktemp("small")
    config = TrainConfig(model="lenet5", epochs=1, batch_size=64, optimizer="sgd", learning_rate=0.05, train_limit=6400, val_size=1000,
                         eval_every=1000, storage=str(storage), name="small", data_dir=str(mnist_dir))
    train_in_process(config, log=lambda _: None)
    return storage / "small"
