"""Each benchmark once, in its smallest form: they run and report; no timing is asserted."""
import json
import os
import platform
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, tool_venv
from mnist_dist.bench.peers import PeerFailed, _run_workers
from mnist_dist.bench.train import summarize
from mnist_dist.bench.tta import first_reaching
from mnist_dist.config import TrainConfig

PEER_LOCK = ROOT / "scripts" / "lock" / f"bench-peer-{platform.machine()}.txt"


@pytest.fixture(scope="session")
def peer_python() -> str:
    """The bench peers' venv, made from their lock as docs/benchmarks.md says (conftest.tool_venv)."""
    return str(tool_venv(PEER_LOCK, "bench-peer") / "bin" / "python")


def assert_a_peer_run(peer: dict, steps: int, global_batch: int, epochs: int, params: int) -> None:
    """The same model, trained for the asked epochs and steps, each epoch timed, and the whole
    run timed from outside."""
    assert peer["params"] == params and len(peer["epoch_seconds"]) == epochs and min(peer["epoch_seconds"]) > 0
    assert peer["train_seconds"] == pytest.approx(sum(peer["epoch_seconds"]))
    assert peer["img_s"] * peer["epoch_seconds"][-1] == pytest.approx(steps * global_batch)
    assert peer["wall_seconds"] > peer["train_seconds"]


@pytest.mark.slow  # trains, starts Ray or exports
def test_bench_train_compares_plain_fit_step_ray_and_the_peers(tmp_path, peer_python):
    out = tmp_path / "train.json"
    proc = run_cli("bench", "train", "--model", "lenet5", "--steps", "3", "--global-batch", "32", "--workers", "2",
                   "--peer-python", peer_python, "--json", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "machine: " in proc.stdout and "tensorflow" in proc.stdout and "vs plain fit" in proc.stdout
    figures = json.loads(out.read_text())
    peers = {"ray TensorflowTrainer + tf_keras fit, 2 workers", "TF_CONFIG + tf_keras fit, no ray, 2 workers"}
    assert set(figures["setups"]) == {"plain keras fit", "plain keras fit, steps_per_execution=10", "project step, 1 process",
                                      "ray, 2 workers", *peers}
    for name in peers:
        assert_a_peer_run(figures["setups"][name], steps=3, global_batch=32, epochs=2, params=61_706)
    assert figures["setups"]["ray TensorflowTrainer + tf_keras fit, 2 workers"]["checkpoint"]  # Ray's callback ran
    assert figures["against_one_process"] == pytest.approx(figures["setups"]["ray, 2 workers"]["img_s"]
                                                           / figures["setups"]["project step, 1 process"]["img_s"])
    assert f"ray, 2 workers against project step, 1 process: {figures['against_one_process']:.2f}x the img/s" in proc.stdout
    assert set(figures["peers"]) == {"ray", "tf-config"}
    for mode, ratio in figures["peers"].items():
        assert ratio["img_s"] == pytest.approx(figures["setups"]["ray, 2 workers"]["img_s"] / figures["setups"][ratio["setup"]]["img_s"])
        assert f"ray, 2 workers against {ratio['setup']}: {ratio['img_s']:.2f}x the img/s" in proc.stdout
    assert figures["ratios_to_plain_fit"]["plain keras fit"] == 1.0
    assert all(s["img_s"] > 0 for s in figures["setups"].values())
    assert figures["rounds"] == 1 and all(s["img_s_runs"] == [s["img_s"]] for s in figures["setups"].values())
    assert figures["allreduce"] == "fp32"
    ray = figures["setups"]["ray, 2 workers"]
    assert ray["wall_seconds"] > ray["train_seconds"] > 0
    assert figures["machine"]["cores"] >= 1 and "keras" in figures["machine"]["versions"]


@pytest.mark.slow  # trains, starts Ray or exports
def test_bench_infer_measures_tensorflow_and_both_onnx_models_of_several_exports(exported, edge_export, tmp_path):
    out = tmp_path / "infer.json"
    proc = run_cli("bench", "infer", "--export", exported["dir"], "--export", edge_export, "--run", exported["dir"].parent,
                   "--iterations", "10", "--seconds", "0.2", "--profile", "--json", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    first, edge, second = figures["exports"]
    # The device model's export has an int4 file too: timed, with its own size and accuracy.
    edge_report = json.loads((edge_export / "report.json").read_text())
    assert edge["model"] == "edge" and edge["runtimes"]["onnxruntime int4"]["size_bytes"] == edge_report["int4"]["size_bytes"]
    assert edge["runtimes"]["onnxruntime int4"]["test_accuracy"] == edge_report["int4"]["ort_accuracy"]
    assert "onnxruntime int4" not in first["runtimes"]
    # The same export twice, side by side: told apart by the run's name.
    assert first["model"] == second["model"] == "tf-tutorial"
    assert first["label"] == "tf-tutorial" and second["label"] == f"tf-tutorial ({exported['dir'].parent.name})"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("tf-tutorial")]
    assert len(rows) == 10 and sum("onnxruntime int8" in row for row in rows) == 4 and "p50 / first int8" in proc.stdout
    runtimes = first["runtimes"]
    assert set(runtimes) == {"tensorflow", "onnxruntime fp32", "onnxruntime int8", "onnxruntime fp32 .ort",
                             "onnxruntime int8 .ort"}
    for row in runtimes.values():
        assert row["latency_us_p99"] >= row["latency_us_p50"] > 0 and row["b256_img_s_1t"] > 0
    assert runtimes["onnxruntime int8"]["size_bytes"] < runtimes["onnxruntime fp32"]["size_bytes"]
    report = json.loads((exported["dir"] / "report.json").read_text())
    for precision in ("fp32", "int8"):  # the .ort rows are the .ort files': their own sizes and accuracies
        row, section = runtimes[f"onnxruntime {precision} .ort"], report["ort_format"][precision]
        assert (row["size_bytes"], row["test_accuracy"]) == (section["size_bytes"], section["ort_accuracy"])
    profile = figures["profile"][first["label"]]
    ops = {op for op, _node, _us in profile["fp32"]}
    assert {"Gemm", "FusedGemm"} & ops and any(op.startswith("Conv") or op == "FusedConv" for op in ops), ops
    assert any(op.startswith("QLinear") or op == "QGemm" for op, _n, _u in profile["int8"])
    assert "floor: one numpy matrix-vector product" in proc.stdout


def test_bench_train_refuses_a_peer_python_that_is_not_the_peers_venv(tmp_path):
    # The project's own environment has no tf_keras, and must not (pyproject.toml's bench-peer).
    proc = run_cli("bench", "train", "--peer-python", sys.executable)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --peer-python {sys.executable} lacks tf_keras. Fix: ")
    assert "scripts/lock/bench-peer-" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "train", "--peer-python", tmp_path / "nothing" / "python")
    assert proc.returncode == 2 and "No such file or directory. Fix: make the venv" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run_cli("bench", "train", "--model", "cnn-deep", "--peer-python", sys.executable)
    assert proc.returncode == 2 and "the peers build tf-tutorial and lenet5 in tf_keras, not cnn-deep" in proc.stderr


STUB_WORKER = """
import os, sys, time
if os.environ["RANK"] == "1":
    sys.exit("worker 1 gave up")
time.sleep(120)  # as a worker waiting on the cluster would
"""


def test_a_peer_worker_that_fails_stops_the_others_and_is_named(tmp_path):
    script = tmp_path / "stub.py"
    script.write_text(STUB_WORKER)
    started = time.monotonic()
    with pytest.raises(PeerFailed, match=r"worker 1 exited with 1:\nworker 1 gave up") as failure:
        _run_workers(sys.executable, "tf-config", "{}", str(tmp_path), dict(os.environ), [{"RANK": "0"}, {"RANK": "1"}],
                     script=script)
    assert time.monotonic() - started < 60 and "TF_CONFIG + tf_keras fit" in str(failure.value)
    alive = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout
    assert not alive, f"left running: {alive}"


def test_a_peer_that_does_not_finish_in_time_is_stopped(tmp_path):
    script = tmp_path / "stub.py"
    script.write_text(STUB_WORKER)
    with pytest.raises(PeerFailed, match="did not finish in 1 s"):
        _run_workers(sys.executable, "ray", "{}", str(tmp_path), dict(os.environ), [{"RANK": "0"}], script=script, deadline_s=1)
    assert not subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout


def test_bench_train_refuses_epochs_longer_than_the_training_set():
    # 400 x 256 images is more than MNIST has: the epoch would be cut short and img/s overstated.
    proc = run_cli("bench", "train", "--steps", "400")
    assert proc.returncode == 2 and "Fix: --steps between 1 and 230" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_infer_refuses_a_missing_export(tmp_path):
    proc = run_cli("bench", "infer", "--export", tmp_path)
    assert proc.returncode == 2 and "no report.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "infer")
    assert proc.returncode == 2 and "Fix: pass --export DIR or --run RUN" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # trains, starts Ray or exports
def test_bench_infer_without_mnist_is_one_line_before_any_measurement(tmp_path, exported):
    proc = run_cli("bench", "infer", "--export", exported["dir"], env={"MNIST_DATA_DIR": str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "MNIST_DATA_DIR" in proc.stderr
    assert "measuring" not in proc.stdout


@pytest.mark.slow  # trains, starts Ray or exports
def test_bench_tta_records_test_accuracy_at_each_interval_and_the_peers(tmp_path, peer_python):
    """In this process: the probes are the training loop's own, on Ray workers as here (rank 0 takes them)."""
    out = tmp_path / "tta.json"
    proc = run_cli("bench", "tta", "--in-process", "--preset", "smoke", "--epochs", "1", "--eval-every", "8",
                   "--target", "0.5", "--storage", tmp_path, "--name", "tta", "--peer-python", peer_python, "--json", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["in_process"] is True and "in this process" in proc.stdout and "RayTrainWorker" not in proc.stdout
    assert [p["step"] for p in figures["probes"]] == [8, 16, 24, 32, 32]  # every 8 steps of 32, and the epoch end
    times = [p["train_seconds"] for p in figures["probes"]]
    assert times == sorted(times) and times[-1] <= figures["train_seconds"] + 1e-6
    assert figures["reached_at"] == first_reaching(figures["probes"], 0.5)
    assert "time to 50.0% test accuracy" in proc.stdout or "did not reach" in proc.stdout
    # The peer without Ray, as --in-process: one TF_CONFIG worker, the same recipe (64 of 2,048 images: 32 steps), probed alike.
    peer = figures["peer"]
    assert_a_peer_run(peer, steps=32, global_batch=64, epochs=1, params=61_706)
    assert [p["step"] for p in peer["probes"]] == [8, 16, 24, 32]
    times = [p["train_seconds"] for p in peer["probes"]]
    assert 0 < times[0] and times == sorted(times) and times[-1] <= peer["train_seconds"]
    assert all(0 <= p["test_accuracy"] <= 1 for p in peer["probes"]) and peer["probes"][-1]["test_accuracy"] > 0.2
    assert peer["reached_at"] == first_reaching(peer["probes"], 0.5)


@pytest.mark.slow  # trains, starts Ray or exports
def test_bench_pipeline_times_the_pipeline_and_the_peers_train_then_convert(tmp_path, peer_python):
    out = tmp_path / "pipeline.json"
    proc = run_cli("bench", "pipeline", "--in-process", "--preset", "smoke", "--peer-python", peer_python, "--json", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    project, peer = figures["project"], figures["peer"]
    assert project["wall_seconds"] > project["train_seconds"] > 0 and 0.2 < project["onnx_accuracy"] <= 1
    assert isinstance(project["verified"], bool)
    # The peer (without Ray, as --in-process) converted its model with tf2onnx and ran it over the test set.
    assert_a_peer_run(peer, steps=32, global_batch=64, epochs=2, params=61_706)
    assert peer["onnx_bytes"] > 4 * 61_706 and peer["convert_seconds"] > 0 and "TF_CONFIG" in proc.stdout
    assert 0.2 < peer["onnx_accuracy"] <= 1 and peer["disagreements"] <= 10  # of 10,000: float sums in another order
    assert f"{project['wall_seconds'] / peer['wall_seconds']:.2f}x its wall seconds" in proc.stdout


@pytest.mark.slow  # trains, starts Ray or exports
def test_bench_startup_compares_a_run_with_ray_trains_floor(tmp_path):
    out = tmp_path / "startup.json"
    proc = run_cli("bench", "startup", "--workers", "1", "--train-limit", "1024", "--json", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["ray_floor_seconds"] > 0 and figures["train_wall_seconds"] > figures["train_seconds"] > 0
    assert figures["workers"] == 1 and figures["train_limit"] == 1024 and figures["peer"] is None
    assert "ray train, function that only reports" in proc.stdout and "mnist-dist train --epochs 1" in proc.stdout


def test_bench_startup_asks_the_ray_peer_for_one_epoch_of_what_train_trains(monkeypatch):
    """The peer's row: Ray's TensorflowTrainer example (run for real by the bench train test,
    through the same peers.measure) for one epoch of train's model, images and global batch."""
    from mnist_dist.bench import peers, startup

    asked = []
    monkeypatch.setattr(startup, "_timed", lambda command: 30.0)
    monkeypatch.setattr(startup, "_train_seconds", lambda storage: 10.0)
    monkeypatch.setattr(peers, "measure", lambda python, mode, config, epochs: asked.append((python, mode, config, epochs)) or {
        "wall_seconds": 90.0, "train_seconds": 30.0, "startup_overhead_seconds": 60.0})
    lines = []
    figures = startup.run(workers=1, train_limit=1024, peer_python="PEER/bin/python", log=lines.append)
    (python, mode, config, epochs), = asked
    assert (python, mode, epochs, config.workers, config.train_limit) == ("PEER/bin/python", "ray", 1, 1, 1024)
    assert (config.model, config.global_batch_size) == (TrainConfig().model, TrainConfig(workers=1).global_batch_size)
    assert figures["startup_overhead_seconds"] == 20.0 and figures["peer"]["startup_overhead_seconds"] == 60.0
    assert "mnist-dist train against the peer: 0.33x its seconds outside training" in lines


def test_bench_startup_refuses_zero_workers():
    proc = run_cli("bench", "startup", "--workers", "0")
    assert proc.returncode == 2 and "--workers must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_first_reaching_picks_the_first_probe_at_or_over_the_target():
    probes = [{"test_accuracy": a, "train_seconds": t} for a, t in ((0.9, 1), (0.991, 2), (0.995, 3))]
    assert first_reaching(probes, 0.99)["train_seconds"] == 2
    assert first_reaching(probes, 0.999) is None


def test_rounds_report_each_setups_median_run_and_the_median_of_its_same_round_ratios():
    runs = {"plain keras fit": [{"img_s": 100.0}, {"img_s": 50.0}, {"img_s": 80.0}],
            "ray, 2 workers": [{"img_s": 90.0, "wall_seconds": 1}, {"img_s": 60.0, "wall_seconds": 2},
                               {"img_s": 40.0, "wall_seconds": 3}]}
    setups, ratios = summarize(runs)
    assert setups["plain keras fit"]["img_s"] == 80.0 and setups["plain keras fit"]["img_s_runs"] == [100.0, 50.0, 80.0]
    assert setups["ray, 2 workers"] == {"img_s": 60.0, "wall_seconds": 2, "img_s_runs": [90.0, 60.0, 40.0]}
    # Per round 0.9, 1.2 and 0.5: the median ratio, not the ratio of the medians (0.75).
    assert ratios == {"plain keras fit": 1.0, "ray, 2 workers": 0.9}
    two_rounds, _ = summarize({"plain keras fit": [{"img_s": 3.0}, {"img_s": 1.0}]})
    assert two_rounds["plain keras fit"]["img_s"] == 1.0  # the lower middle of an even count
