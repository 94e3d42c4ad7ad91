"""The built wheel, installed non-editable into a fresh venv, run as a user would: from
another working directory, with relative paths, on a real local Ray."""
import json
import os
import re
import subprocess
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with the wheel and its `train` extra; returns its bin/ folder."""
    env_dir = tmp_path_factory.mktemp("wheel-venv")
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The training stack (TensorFlow, Ray: about 2 GB) comes from this environment through a
    # path entry instead of a second download. Python runs no .pth file of a path entry, so
    # the checkout's editable install stays out: mnist_dist can only come from the wheel.
    (Path(site) / "training-stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", f"{wheel}[train]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the extra resolves from the wheel's metadata
    return env_dir / "bin"


def user_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MNIST_DATA_DIR")}
    return {**env, **extra}


def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mnist_dist").rglob("*.py")}
    sources |= {p.relative_to(ROOT / "export").as_posix() for p in (ROOT / "export" / "mnist_edge").rglob("*.py")}
    assert "mnist_dist/bench/train.py" in sources and sources <= names, sorted(sources - names)


def test_the_installed_wheel_trains_in_process_from_relative_paths(installed, tmp_path, mnist_dir):
    home = tmp_path / "somewhere" / "else"
    home.mkdir(parents=True)
    where = subprocess.run([installed / "python", "-c", "import mnist_dist.bench.train, mnist_dist; print(mnist_dist.__file__)"],
                           capture_output=True, text=True, cwd=home, env=user_env())
    assert where.stdout.startswith(str(installed.parent)), where.stdout + where.stderr  # the wheel's, not the checkout's
    proc = subprocess.run([installed / "mnist-dist", "bench", "train", "--help"], capture_output=True, text=True, env=user_env())
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mnist-dist bench train"), proc.stderr
    proc = subprocess.run([installed / "mnist-dist", "train", "--preset", "smoke", "--in-process", "--epochs", "1",
                           "--data-dir", os.path.relpath(mnist_dir, home), "--storage", "runs", "--name", "wheel"],
                          capture_output=True, text=True, cwd=home, env=user_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((home / "runs" / "wheel" / "result.json").read_text())
    assert Path(result["config"]["data_dir"]) == mnist_dir.resolve()  # settled to an absolute path


# Each line a first pipeline prints, after Ray's "(RayTrainWorker pid=N)" prefix and a worker's "[rank R]".
OWN_LINES = ("worker threads pinned: ", "MNIST from ", "model lenet5: ", "step ", "epoch 1/1: ", "best epoch 1: ",
             "time: ", "best checkpoint: ", "run directory: ", "exporting lenet5 from ", "converted to ONNX ",
             "quantized to int8 ", "converted both to the ONNX Runtime format ", "verifying on all 10000 test images",
             "  TensorFlow: ", "  ONNX Runtime model", "  timing model", "fp32: accuracy ", "int8: accuracy ",
             "fp32 .ort: accuracy ", "int8 .ort: accuracy ", "verified export written to ", '{"best_epoch"')


def test_a_new_users_first_pipeline_from_the_readme_offline_recipe(installed, tmp_path, mnist_dir):
    """`export MNIST_DATA_DIR=../shared/data/mnist && mnist-dist pipeline --name first`, shortened,
    as a new user has it: the wheel, a fresh HOME, no RAY_AUTH_* settings.

    Ray workers start in another working directory, so the driver must hand them absolute
    paths. Every line printed is the project's own (no library banner or warning the user can
    do nothing about), and Ray's token authentication is still on.
    """
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    env = {k: v for k, v in user_env(MNIST_DATA_DIR=os.path.relpath(mnist_dir, project), HOME=str(home)).items()
           if not k.startswith("RAY_AUTH") and k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([installed / "mnist-dist", "pipeline", "--preset", "smoke", "--epochs", "1", "--name", "first",
                           "--max-int8-drop", "5"],  # a 1-epoch smoke net is too weak for the 0.1 pp gate
                          capture_output=True, text=True, cwd=project, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = project / "runs" / "first"
    assert json.loads((run / "result.json").read_text())["epochs_completed"] == 1
    assert json.loads((run / "export" / "report.json").read_text())["verified"] is True
    # Piped, as into a file or `kubectl logs`: no escape code anywhere, and each worker line names its rank.
    assert "\x1b" not in proc.stdout + proc.stderr, [line for line in proc.stdout.splitlines() if "\x1b" in line][:3]
    workers = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("(RayTrainWorker pid=")]
    assert workers and all(re.match(r"\(RayTrainWorker pid=\d+\) \[rank \d+\] ", line) for line in workers), workers[:3]
    lines = [re.sub(r"^\(\w+ pid=\d+\) (\[rank \d+\] )?", "", line)
             for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    # A line for each start-up phase as it begins, with the seconds since the command started;
    # the first one before Ray starts (progress.Clock).
    phases = [(float(m[1]), m[2]) for m in (re.match(r"\[ *(\d+\.\d) s\] (.*)", line) for line in lines) if m]
    assert proc.stdout.splitlines()[0] == lines[0] and re.search(r"starting a local Ray with \d+ CPUs \.\.\.$", lines[0]), lines[:2]
    expected = ["starting a local Ray with ", "Ray is up", "asking Ray for 2 worker(s) x 1 CPU",
                "2 worker(s) started; importing TensorFlow", "joining the workers into one MultiWorkerMirroredStrategy",
                "loading MNIST", "tracing and compiling the train step"]
    assert [text for _, text in phases] and all(text.startswith(want) for (_, text), want in zip(phases, expected)), phases
    assert len(phases) == len(expected) and [t for t, _ in phases] == sorted(t for t, _ in phases), phases
    lines = [line for line in lines if not re.match(r"\[ *\d+\.\d s\] ", line)]
    strangers = [line for line in lines if not line.startswith(OWN_LINES)]
    assert not strangers, "lines that are not the project's own:\n" + "\n".join(strangers)
    # Ray made the run's token itself, as it does for any new local Ray with authentication on.
    assert (home / ".ray" / "auth_token").is_file()
