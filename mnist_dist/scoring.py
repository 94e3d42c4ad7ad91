"""Scores that every worker computes alike: each scores a slice, one all-reduce adds them up."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def make_worker_sum(strategy, world_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Adds up a small float vector over the workers with one all-reduce."""
    import tensorflow as tf

    if world_size == 1:
        return lambda values: values

    @tf.function
    def worker_sum(values):
        # Every local replica of a worker holds that worker's values, so the mean over all
        # replicas times the workers is the sum over workers, however many replicas each has.
        mean = strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(tf.identity, args=(values,)), axis=None)
        return mean * world_size

    return lambda values: worker_sum(tf.constant(values, tf.float32)).numpy()


def make_evaluator(model, strategy=None, rank: int = 0, world_size: int = 1) -> Callable[[np.ndarray, np.ndarray], tuple[float, float]]:
    """(loss, accuracy) of the current weights on uint8 images, the same on every worker.

    Each of the `world_size` workers scores its own slice and one all-reduce adds up the
    totals, so all of them must call it at the same points: scored on rank 0 alone, the
    other workers would sit idle while it scores.
    """
    import keras
    import tensorflow as tf

    from mnist_dist.tfdata import eval_dataset

    worker_sum = make_worker_sum(strategy, world_size)

    @tf.function
    def batch_stats(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        correct = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == labels, tf.float32))
        return loss, correct

    def evaluate(images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        bounds = np.linspace(0, len(labels), world_size + 1).astype(int)
        mine = slice(bounds[rank], bounds[rank + 1])
        total_loss = total_correct = 0.0
        for x, y in eval_dataset(images[mine], labels[mine]):
            loss, correct = batch_stats(x, y)
            total_loss += float(loss)
            total_correct += float(correct)
        total_loss, total_correct = worker_sum(np.array([total_loss, total_correct], np.float32))
        return float(total_loss) / len(labels), float(total_correct) / len(labels)

    return evaluate
