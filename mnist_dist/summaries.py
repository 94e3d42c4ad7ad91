"""TensorBoard event files for a run: scalars and the model graph, written by rank 0 only.

Tags (all indexed by global step):
- `train/loss`, `train/learning_rate`, `train/minibatch_error`, `train/images_per_second`
  at each eval interval;
- `val/error`, `val/accuracy` at each eval interval and at the end of each epoch;
- `epoch/train_loss`, `epoch/val_loss`, `epoch/val_accuracy`, `epoch/images_per_second`
  at the end of each epoch.

    tensorboard --logdir RUN_DIR/tensorboard
"""
from __future__ import annotations

from pathlib import Path

from mnist_dist.store import Location

SUBDIR = "tensorboard"

INTERVAL_TAGS = ("train/loss", "train/learning_rate", "train/minibatch_error", "train/images_per_second",
                 "val/error", "val/accuracy")
EPOCH_TAGS = ("epoch/train_loss", "epoch/val_loss", "epoch/val_accuracy", "epoch/images_per_second")


class Summaries:
    """A no-op unless given a location, so every rank can call it unconditionally. The events
    are written into a local folder; a bucket's are put into it at each `sync` (Location.mirror)."""

    def __init__(self, location: Location | None):
        import tensorflow as tf

        self._tf = tf
        self._mirror = location.mirror() if location is not None else None
        self._writer = tf.summary.create_file_writer(str(self._mirror.path)) if self._mirror else None

    def sync(self) -> None:
        """Put this writer's event files into a bucket (a no-op for a local run)."""
        if self._mirror is not None:
            self._mirror.sync()

    def graph(self, model, input_shape=(None, 28, 28, 1)) -> None:
        """The inference graph, as TensorBoard's Graphs tab shows it."""
        if self._writer is None:
            return
        tf = self._tf
        forward = tf.function(lambda images: model(images, training=False))
        concrete = forward.get_concrete_function(tf.TensorSpec(input_shape, tf.float32, name="image"))
        with self._writer.as_default():
            tf.summary.graph(concrete.graph)
        self._writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                self._tf.summary.scalar(tag, float(value))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._mirror.close()


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from a run's event files, with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import tensorflow as tf

    accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    series: dict[str, list[tuple[int, float]]] = {}
    for tag in accumulator.Tags().get("tensors", []):
        events = accumulator.Tensors(tag)
        series[tag] = [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in events]
    # A resumed run writes a second file that repeats the steps after the checkpoint: keep the latest value.
    return {tag: sorted(dict(points).items()) for tag, points in series.items()}
