"""`mnist-dist baseline`: the notebooks' reference points on the CNN's own data split.

Logistic regression (softmax on raw pixels) and a one-hidden-layer MLP; their scores are in
docs/benchmarks.md#accuracy-and-wall-time-of-full-runs. They are single-process Keras `fit`
runs: no distribution is needed to show how far the CNN goes past them. The epoch kept is the one with the best validation accuracy, and
the test set is scored once, as for the CNN.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from mnist_dist.store import Location

BASELINES_FILE = "baselines.json"
NAMES = ("logreg", "mlp")


def build(name: str, hidden: int = 512):
    from mnist_dist.process_setup import import_tensorflow

    import_tensorflow()
    import keras
    from keras import layers

    body = [layers.Flatten()]
    if name == "mlp":
        # Dropout: without it the MLP overfits within a few epochs and stalls below its best.
        body += [layers.Dense(hidden, activation="relu"), layers.Dropout(0.3)]
    model = keras.Sequential([keras.Input((28, 28, 1)), *body, layers.Dense(10)], name=name)
    optimizer = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def train_baseline(name: str, data, epochs: int = 10, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    import keras

    from mnist_dist.data import normalize

    keras.utils.set_random_seed(seed)
    model = build(name)
    with tempfile.TemporaryDirectory(prefix="mnist-baseline-") as tmp:
        best_weights = f"{tmp}/best.weights.h5"
        keep_best = keras.callbacks.ModelCheckpoint(best_weights, monitor="val_accuracy", mode="max",
                                                    save_best_only=True, save_weights_only=True)
        started = time.perf_counter()
        history = model.fit(normalize(data.train_x), data.train_y, batch_size=batch_size, epochs=epochs, verbose=0,
                            validation_data=(normalize(data.val_x), data.val_y), callbacks=[keep_best])
        seconds = time.perf_counter() - started
        model.load_weights(best_weights)
    val_accuracy = history.history["val_accuracy"]
    _loss, test_accuracy = model.evaluate(normalize(data.test_x), data.test_y, batch_size=1000, verbose=0)
    return {"model": name, "parameters": model.count_params(), "epochs": epochs,
            "best_epoch": int(max(range(epochs), key=val_accuracy.__getitem__)) + 1,
            "val_accuracy": float(max(val_accuracy)), "test_accuracy": float(test_accuracy), "train_seconds": seconds}


MADE_BY = "mnist-dist baseline"
OUT_FIX = "choose another --out file"


def run(config, names=NAMES, epochs: int = 10, out: Location | None = None, run_dir: Location | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each baseline on `config`'s data split; the results go to `out`, else RUN/baselines.json
    (which `report` shows beside the CNN). Every output is checked before any training."""
    from mnist_dist import ownership
    from mnist_dist.data import load_for, verify_dir

    if not config.synthetic:
        verify_dir(config.data_dir)  # bad data fails first, in seconds
    if run_dir is not None:
        from mnist_dist.results import require_run_dir
        require_run_dir(run_dir)
    out = out or (run_dir / BASELINES_FILE if run_dir is not None else None)
    if out is not None:
        ownership.check_file_replaceable(out, MADE_BY, OUT_FIX)
    data = load_for(config)
    log(data.describe())
    rows = []
    for name in names:
        log(f"training {name} for {epochs} epochs ...")
        row = train_baseline(name, data, epochs=epochs, batch_size=config.batch_size, seed=config.seed)
        log(f"{name}: {row['parameters']:,} parameters, best epoch {row['best_epoch']}, validation "
            f"{100 * row['val_accuracy']:.2f}%, test {100 * row['test_accuracy']:.2f}% ({row['train_seconds']:.0f} s)")
        rows.append(row)
    result = {"baselines": rows, "data_source": data.source, "val_size": config.val_size,
              "train_images": len(data.train_y)}
    if out is not None:
        result = {ownership.MADE_BY: MADE_BY, **result}
        ownership.check_file_replaceable(out, MADE_BY, OUT_FIX)  # again: minutes have passed
        out.write_json(result)
        log(f"wrote {out}")
    return result


def load(run_dir: Location) -> dict[str, Any] | None:
    from mnist_dist.rundir import read_json

    return read_json(run_dir, BASELINES_FILE)
