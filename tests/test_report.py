"""Observability: TensorBoard events of a real Ray run, `mnist-dist report` and `mnist-dist baseline`."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from mnist_dist import summaries
from mnist_dist.report import confusion_matrix, grid_indices


@pytest.mark.slow  # trains, starts Ray or exports
def test_tensorboard_events_hold_every_scalar_and_the_graph(ray_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = ray_run["run_dir"] / summaries.SUBDIR
    event_files = list(logdir.glob("events.out.tfevents.*"))
    assert len(event_files) == 1, "rank 0 alone writes events"
    scalars = summaries.read_scalars(logdir)
    assert set(summaries.INTERVAL_TAGS + summaries.EPOCH_TAGS) <= set(scalars)
    result = ray_run["result"]
    # 2 epochs x 64 steps, an interval line every 20 steps, and one record per epoch end.
    assert [step for step, _ in scalars["epoch/val_accuracy"]] == [m["global_step"] for m in result["history"]]
    assert [v for _, v in scalars["epoch/val_accuracy"]] == pytest.approx([m["val_accuracy"] for m in result["history"]])
    assert [step for step, _ in scalars["train/loss"]] == [20, 40, 60, 80, 100, 120]
    assert all(0 < lr <= 0.05 + 1e-6 for _, lr in scalars["train/learning_rate"])  # float32
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    assert accumulator.Tags()["graph"], "the model graph is in the events"
    assert any(node.op == "Conv2D" for node in accumulator.Graph().node)


def assert_real_picture(path, min_size=(400, 300)):
    image = Image.open(path)
    image.verify()  # a valid PNG, not a truncated one
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape[1] >= min_size[0] and pixels.shape[0] >= min_size[1], pixels.shape
    assert pixels.std() > 10, f"{path.name} is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{path.name} has almost no content"


@pytest.mark.slow  # trains, starts Ray or exports
def test_report_of_a_real_run_with_baselines_and_export(ray_run, exported):
    run_dir = ray_run["run_dir"]
    proc = run_cli("baseline", "--run", run_dir, "--epochs", "2", "--train-limit", "4096", "--val-size", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logreg: 7,850 parameters" in proc.stdout and "mlp: 407,050 parameters" in proc.stdout
    rows = {row["model"]: row for row in json.loads((run_dir / "baselines.json").read_text())["baselines"]}
    assert rows["logreg"]["test_accuracy"] > 0.8 and rows["mlp"]["test_accuracy"] > 0.85

    proc = run_cli("report", "--run", run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "report"
    for name in ("curves.png", "predictions.png", "confusion.png"):
        assert_real_picture(out / name)
    text = (out / "report.md").read_text()
    result = ray_run["result"]
    assert f"**Test accuracy {100 * result['test_accuracy']:.2f}%**" in text
    assert f"epoch {result['best_epoch']}, chosen because it has the highest validation accuracy" in text
    for needle in ("![training curves](curves.png)", "![test predictions](predictions.png)", "| logreg | 7,850 |",
                   "## Export", "| fp32 |", "| int8 |", "| fp32 .ort |", "| int8 .ort |", '"model": "tf-tutorial"', "machine: ", "keras 3."):
        assert needle in text, needle
    epoch_rows = [line for line in text.splitlines() if line.startswith(("| 1 ", "| 2 ", "| 3 "))]
    assert len(epoch_rows) == len(result["history"]) == 2

    # Run again, the report replaces its own earlier one (it carries the ownership marker).
    assert json.loads((out / ".mnist-dist.json").read_text())["kind"] == "report"
    proc = run_cli("report", "--run", run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".mnist-dist.json", "confusion.png", "curves.png",
                                                     "predictions.png", "report.md"]


def test_report_refuses_unfinished_or_missing_runs(tmp_path):
    proc = run_cli("report", "--run", tmp_path / "nope")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "half" / "checkpoint_epoch001").mkdir(parents=True)
    proc = run_cli("report", "--run", tmp_path / "half")
    assert proc.returncode == 2 and "did not finish" in proc.stderr and "re-run" in proc.stderr


def test_prediction_grid_shows_wrong_guesses_first():
    labels = np.arange(100) % 10
    predicted = labels.copy()
    predicted[[5, 51, 77]] = 0
    chosen = grid_indices(predicted, labels, 10)
    assert list(chosen[:3]) == [5, 51, 77] and len(chosen) == 10 and len(set(chosen)) == 10


def test_confusion_matrix_counts_every_image():
    labels = np.array([0, 1, 1, 2, 9])
    predicted = np.array([0, 1, 7, 2, 4])
    matrix = confusion_matrix(labels, predicted)
    assert matrix.sum() == 5 and matrix.trace() == 3 and matrix[1, 7] == 1 and matrix[9, 4] == 1
