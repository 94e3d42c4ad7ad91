"""The GPU path's decisions, on the CPU: scripts/gpu-check.sh's dry run, what each of its runs
asks of Ray, the collective and precision chosen, and the verdicts its summary draws."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_dist import process_setup
from mnist_dist.cli import build_parser, config_from_args
from mnist_dist.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT, SUMMARY = ROOT / "scripts" / "gpu-check.sh", ROOT / "scripts" / "gpu_check_summary.py"


@pytest.fixture(scope="module")
def dry_run() -> dict[str, list[str]]:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "WORK": "/tmp/gpu-check-dry", "OUT": "/tmp/gpu-check-dry-out"})
    assert proc.returncode == 0, proc.stderr
    steps = {}
    for line in proc.stdout.splitlines():
        name, _, command = line.partition(": ")
        steps[name] = shlex.split(command)
    assert not Path("/tmp/gpu-check-dry").exists()  # a dry run makes nothing
    return steps


def train_config(command: list[str]) -> TrainConfig:
    assert Path(command[0]).name == "mnist-dist" and command[1] == "train", command
    return config_from_args(build_parser().parse_args(command[1:])).validate()


def test_the_dry_run_names_every_step_in_order(dry_run):
    assert list(dry_run) == ["install", "gpus", "fp32", "bf16", "shared", "export", "summary"]
    assert "'.[train-gpu]'" in dry_run["install"][-1] and "pip' check" in dry_run["install"][-1]
    assert dry_run["export"][1:] == ["export", "--run", "/tmp/gpu-check-dry/runs/fp32"]


def test_one_gpu_worker_asks_ray_for_a_whole_gpu(dry_run):
    from mnist_dist.launcher import scaling_config

    config = train_config(dry_run["fp32"])
    assert (config.workers, config.gpus_per_worker, config.precision) == (1, 1, "fp32")
    scaling = scaling_config(config)
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert process_setup.device_plan(config.cpus_per_worker, config.gpus_per_worker).collective == "NCCL"


def test_bf16_on_a_gpu_is_allowed_and_sums_gradients_in_fp32(dry_run):
    config = train_config(dry_run["bf16"])
    assert config.precision == "bf16" and config.allreduce_dtype == "fp32"
    with pytest.raises(ConfigError, match="bf16"):
        config.replace(allreduce="bf16").validate()


def test_two_workers_sharing_one_gpu_use_ring_not_nccl(dry_run):
    from mnist_dist.launcher import scaling_config

    config = train_config(dry_run["shared"])
    assert (config.workers, config.gpus_per_worker) == (2, 0.5)
    scaling = scaling_config(config)
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert process_setup.device_plan(config.cpus_per_worker, config.gpus_per_worker).collective == "RING"


@pytest.mark.parametrize("gpus, collective", [(0, "RING"), (0.25, "RING"), (0.5, "RING"), (1, "NCCL"), (2, "NCCL")])
def test_nccl_only_when_each_worker_has_a_gpu_of_its_own(gpus, collective):
    plan = process_setup.device_plan(1, gpus)
    assert plan.collective == collective and plan.use_gpu == (gpus > 0)


@pytest.mark.parametrize("gpus", [1.5, -1, float("inf")])
def test_a_gpu_count_that_cannot_work_is_refused(gpus):
    with pytest.raises(ConfigError, match="--gpus-per-worker"):
        TrainConfig(gpus_per_worker=gpus).validate()


def test_the_gpu_line_says_what_tensorflow_sees():
    line = process_setup.gpu_line(process_setup.device_plan(1, 0.5), workers=2)
    assert line == "GPU worker: TensorFlow sees 0 GPU(s) (none); collective RING"  # no GPU here


def fake_check(tmp_path: Path, seen: dict[str, str], accuracy: float, verified: bool) -> Path:
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    for name, collective in seen.items():
        workers = 2 if name == "shared" else 1
        (runs / name).mkdir(parents=True)
        (runs / name / "result.json").write_text(json.dumps(
            {"workers": workers, "test_accuracy": accuracy, "history": [{"images_per_second": 1234.0}]}))
        (out / f"{name}.log").write_text(f"(RayTrainWorker pid=1) GPU worker: TensorFlow sees 1 GPU(s) "
                                         f"(/device:GPU:0); collective {collective}\n")
        (out / f"{name}.rc").write_text("0\n")
    (runs / "fp32" / "export").mkdir()
    (runs / "fp32" / "export" / "report.json").write_text(json.dumps({"verified": verified, "fp32": {}, "int8": {}}))
    return tmp_path


def summarize(tmp_path: Path, real_data: bool = True) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path / "runs"), str(tmp_path / "out")],
                          capture_output=True, text=True, env={"REAL_DATA": "1" if real_data else ""})
    return proc.returncode, json.loads((tmp_path / "out" / "gpu-check.json").read_text())


def test_the_summary_passes_a_good_check(tmp_path):
    code, summary = summarize(fake_check(tmp_path, {"fp32": "none", "bf16": "none", "shared": "RING"}, 0.985, True))
    assert code == 0 and summary["passed"] and summary["runs"]["shared"]["images_per_second"] == 1234.0


@pytest.mark.parametrize("seen, accuracy, verified, failed", [
    ({"fp32": "none", "bf16": "none", "shared": "NCCL"}, 0.985, True, "shared"),  # NCCL on a shared GPU
    ({"fp32": "none", "bf16": "none", "shared": "RING"}, 0.5, True, "fp32"),  # accuracy too low
    ({"fp32": "none", "bf16": "none", "shared": "RING"}, 0.985, False, None),  # export not verified
])
def test_the_summary_fails_what_is_wrong(tmp_path, seen, accuracy, verified, failed):
    code, summary = summarize(fake_check(tmp_path, seen, accuracy, verified))
    assert code == 1 and not summary["passed"]
    if failed:
        assert not summary["runs"][failed]["passed"]


def test_the_summary_fails_a_run_that_saw_no_gpu(tmp_path):
    fake_check(tmp_path, {"fp32": "none", "bf16": "none", "shared": "RING"}, 0.985, True)
    log = tmp_path / "out" / "bf16.log"
    log.write_text(log.read_text().replace("sees 1 GPU(s)", "sees 0 GPU(s)"))
    code, summary = summarize(tmp_path)
    assert code == 1 and summary["runs"]["bf16"]["checks"]["on_gpu"] is False
