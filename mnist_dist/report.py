"""`mnist-dist report --run RUN_DIR`: plots and a one-page report of a finished run.

Writes RUN_DIR/report/:
- `curves.png`: minibatch and validation curves against steps (from the TensorBoard
  events) and per-epoch loss, error and learning rate (from result.json);
- `predictions.png`: test images with the model's guess, wrong guesses in red with the
  true label, as in the tutorial notebook;
- `confusion.png`: the test-set confusion matrix;
- `report.md`: configuration, machine and versions, per-epoch metrics, the best
  checkpoint and why, test accuracy, baselines and the export's parity and latency.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mnist_dist import baselines, summaries
from mnist_dist.errors import RunError
from mnist_dist.results import RESULT_FILE, best_checkpoint, require_run_dir
from mnist_dist.store import Location, Where

REPORT_DIR = "report"
GRID = (6, 10)  # rows x columns of the prediction grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def load_result(run_dir: Location) -> dict[str, Any]:
    from mnist_dist.rundir import read_json

    result = read_json(require_run_dir(run_dir), RESULT_FILE)
    if result is None:
        raise RunError(f"{run_dir}: no {RESULT_FILE}, so the run did not finish. Fix: re-run the same "
                       "`mnist-dist train` command to resume it, then report.")
    return result


def plot_curves(result: dict[str, Any], scalars: dict[str, list[tuple[int, float]]], path: Path) -> None:
    plt = _pyplot()
    history = result["history"]
    epochs = [m["epoch"] for m in history]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))

    def series(ax, tag, label, scale=1.0):
        if scalars.get(tag):
            steps, values = zip(*scalars[tag])
            ax.plot(steps, [scale * v for v in values], label=label)

    series(axes[0, 0], "train/loss", "minibatch loss")
    axes[0, 0].set(title="loss by step", xlabel="global step", yscale="log")
    series(axes[0, 1], "train/minibatch_error", "minibatch error", 100)
    series(axes[0, 1], "val/error", "validation error", 100)
    axes[0, 1].set(title="error by step (%)", xlabel="global step", yscale="log")
    series(axes[0, 2], "train/learning_rate", "learning rate")
    axes[0, 2].set(title="learning rate by step", xlabel="global step")
    axes[1, 0].plot(epochs, [m["train_loss"] for m in history], "o-", label="training loss (epoch mean)")
    axes[1, 0].plot(epochs, [m["val_loss"] for m in history], "o-", label="validation loss")
    axes[1, 0].set(title="loss by epoch", xlabel="epoch", yscale="log")
    axes[1, 1].plot(epochs, [100 * (1 - m["val_accuracy"]) for m in history], "o-", label="validation error")
    axes[1, 1].axvline(result["best_epoch"], color="green", linestyle=":", label=f"best epoch {result['best_epoch']}")
    axes[1, 1].set(title="validation error by epoch (%)", xlabel="epoch")
    axes[1, 2].plot(epochs, [m["learning_rate"] for m in history], "o-", label="learning rate at epoch end")
    axes[1, 2].set(title="learning rate by epoch", xlabel="epoch")
    for ax in axes.flat:
        if ax.get_lines():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['config']['model']}: {result['workers']} worker(s), global batch {result['global_batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grid_indices(predicted: np.ndarray, labels: np.ndarray, cells: int) -> np.ndarray:
    """Wrong guesses first (at most half the grid), then the first test images in order."""
    wrong = np.flatnonzero(predicted != labels)[: cells // 2]
    right = np.setdiff1d(np.arange(len(labels)), wrong)[: cells - len(wrong)]
    return np.concatenate([wrong, right])


def plot_predictions(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    plt = _pyplot()
    rows, cols = GRID
    chosen = grid_indices(predicted, labels, rows * cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.4))
    for ax, index in zip(axes.flat, chosen):
        ok = predicted[index] == labels[index]
        ax.imshow(images[index], cmap="gray")
        ax.set_title(f"{predicted[index]}" if ok else f"{predicted[index]} (true {labels[index]})",
                     color="black" if ok else "red", fontsize=9, fontweight="normal" if ok else "bold")
        if not ok:
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=3)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    errors = int((predicted != labels).sum())
    fig.suptitle(f"test images: guess above each; red = wrong, with the true label "
                 f"({errors} of {len(labels)} wrong; wrong ones shown first)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = 10) -> np.ndarray:
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def plot_confusion(matrix: np.ndarray, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    # Log colours: the diagonal holds ~1,000 per class and the errors a handful.
    image = ax.imshow(np.log10(1 + matrix), cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if row == col else "red")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"test confusion matrix ({int(matrix.trace())} of {int(matrix.sum())} right)")
    fig.colorbar(image, ax=ax, label="log10(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict[str, Any], run_dir: Location, test_accuracy: float, matrix: np.ndarray,
             baseline: dict[str, Any] | None, export: dict[str, Any] | None) -> str:
    from mnist_dist.machine import describe, summary_lines

    config = result["config"]
    lines = [f"# Run report: {run_dir.name}", "",
             f"`{config['model']}` trained for {result['epochs_completed']} epochs on {result['workers']} worker(s), "
             f"global batch {result['global_batch_size']}, precision {config['precision']}. "
             f"Data: `{result.get('data_source')}`.", "",
             f"**Test accuracy {100 * test_accuracy:.2f}%** (error {100 * (1 - test_accuracy):.2f}%, "
             f"{int(matrix.sum() - matrix.trace())} of {int(matrix.sum())} test images wrong).", "",
             "## Best checkpoint", "",
             f"`{result['best_checkpoint']}`: epoch {result['best_epoch']}, chosen because it has the highest "
             f"validation accuracy ({100 * result['best_val_accuracy']:.2f}% on {config['val_size']} held-out training "
             f"images) of the {result['epochs_completed']} epochs. The test set was not used to choose it.", "",
             "## Curves", "", "![training curves](curves.png)", "",
             "## Predictions", "", "![test predictions](predictions.png)", "", "![confusion matrix](confusion.png)", "",
             "## Per-epoch metrics", "",
             "| epoch | step | train loss | val loss | val accuracy | learning rate | train s | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["history"]:
        mark = " **best**" if m["epoch"] == result["best_epoch"] else ""
        lines.append(f"| {m['epoch']}{mark} | {m['global_step']} | {m['train_loss']:.4f} | {m['val_loss']:.4f} | "
                     f"{100 * m['val_accuracy']:.2f}% | {m['learning_rate']:.5f} | {m['epoch_train_seconds']:.1f} | "
                     f"{m['images_per_second']:.0f} |")
    lines += ["", f"Training time {result.get('train_seconds') or 0:.0f} s; wall time {result.get('wall_seconds') or 0:.0f} s "
              "(start-up, evaluation and checkpoints included).", ""]
    if baseline:
        lines += ["## Baselines (same split)", "", "| model | parameters | val accuracy | test accuracy |", "|---|---|---|---|"]
        for row in baseline["baselines"]:
            lines.append(f"| {row['model']} | {row['parameters']:,} | {100 * row['val_accuracy']:.2f}% | "
                         f"{100 * row['test_accuracy']:.2f}% |")
        lines += [f"| **{config['model']}** | | {100 * result['best_val_accuracy']:.2f}% | **{100 * test_accuracy:.2f}%** |", ""]
    else:
        lines += ["## Baselines", "", f"None yet: `mnist-dist baseline --run {run_dir}` adds them.", ""]
    if export:
        lines += ["## Export", "", f"{'Verified' if export['verified'] else 'REJECTED'}, ONNX opset {export['opset']}, "
                  f"on all {export['test_images']} test images against TensorFlow:", "",
                  "| model | ORT accuracy | argmax disagreements | max abs logit diff | size | p50 / p99 batch 1 | batch 256 |",
                  "|---|---|---|---|---|---|---|"]
        from mnist_dist.export import sections_of

        for name, s in sections_of(export).items():  # fp32, int8, their .ort twins, int4
            lines.append(f"| {name} | {100 * s['ort_accuracy']:.2f}% | {s['argmax_disagreements']} | "
                         f"{s['max_abs_logit_diff']:.2e} | {s['size_bytes'] / 1e6:.2f} MB | "
                         f"{s['latency_us_p50']:.0f} / {s['latency_us_p99']:.0f} µs | {s['throughput_b256']:.0f} img/s |")
        lines.append("")
    else:
        lines += ["## Export", "", f"None yet: `mnist-dist export --run {run_dir}` makes one.", ""]
    machine = result.get("machine") or describe()
    lines += ["## Configuration", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
              "## Machine and versions", "", *[f"- {line}" for line in summary_lines(machine)], ""]
    return "\n".join(lines)


def write_report(run: Where, out: Where | None = None, log: Callable[[str], None] = print) -> Location:
    """Write the report into `out` (default RUN/report), replacing only an earlier report there."""
    from mnist_dist import ownership

    run_dir = Location.of(run)
    result = load_result(run_dir)
    out_dir = Location.of(out) if out is not None else run_dir / REPORT_DIR
    fix = "choose another --out (a report never replaces a folder it did not write)"
    ownership.check_replaceable(out_dir, "report", (run_dir,), fix)  # before any work
    with out_dir.staging() as staged:
        ownership.mark(staged, "report")
        _write_report(run_dir, result, staged, log)
        ownership.publish(staged, out_dir, "report", commit="report.md", protected=(run_dir,), fix=fix)
    log(f"report written to {out_dir}: report.md, curves.png, predictions.png, confusion.png")
    return out_dir


def _write_report(run_dir: Location, result: dict[str, Any], out_dir: Path, log: Callable[[str], None]) -> None:
    from mnist_dist.checkpoint import load_model_at
    from mnist_dist.config import TrainConfig
    from mnist_dist.evaluate import predict_logits
    from mnist_dist.export import read_report
    from mnist_dist.data import load_for

    checkpoint, _best = best_checkpoint(run_dir)
    model, _state = load_model_at(checkpoint)

    scalars = step_scalars(run_dir)
    if not scalars:
        log(f"no TensorBoard events in {run_dir / summaries.SUBDIR}: the step curves stay empty")
    plot_curves(result, scalars, out_dir / "curves.png")
    data = load_for(TrainConfig.from_saved(result["config"]))
    log(f"predicting {len(data.test_y)} test images with {checkpoint.name} ...")
    predicted = predict_logits(model, data.test_x).argmax(1)
    test_accuracy = float((predicted == data.test_y).mean())
    plot_predictions(data.test_x, data.test_y, predicted, out_dir / "predictions.png")
    matrix = confusion_matrix(data.test_y, predicted)
    plot_confusion(matrix, out_dir / "confusion.png")

    export = read_report(run_dir / "export")
    (out_dir / "report.md").write_text(markdown(result, run_dir, test_accuracy, matrix, baselines.load(run_dir), export))


def step_scalars(run_dir: Location) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars ({} without events), read from a local copy."""
    events = run_dir / summaries.SUBDIR
    if not events.is_dir():
        return {}
    with events.local_copy() as local:
        return summaries.read_scalars(local)
