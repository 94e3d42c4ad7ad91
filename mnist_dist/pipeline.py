"""tf.data input: every worker walks the same per-epoch permutation and takes its own
slice of each global batch, so the replicas together see each global batch exactly once.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from mnist_dist.data import PIXEL_OFFSET, PIXEL_SCALE


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The same on every worker (same seed), different every epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard_indices(n: int, seed: int, epoch: int, global_batch: int, num_shards: int, shard_ids) -> np.ndarray:
    """Sample indices of some replicas (shards) for one epoch: (steps * len(shard_ids), per_replica).

    Each global batch is split into `num_shards` consecutive slices, one per replica; a
    pipeline that feeds several local replicas yields their slices in turn, as
    `distribute_datasets_from_function` expects. The tail that does not fill a whole
    global batch is dropped, so every worker runs the same number of synchronous steps.
    """
    if global_batch % num_shards:
        raise ValueError(f"global batch {global_batch} does not split evenly over {num_shards} replicas")
    steps = n // global_batch
    if steps == 0:
        raise ValueError(f"{n} training images are fewer than one global batch of {global_batch}; use a smaller --batch-size")
    per_replica = global_batch // num_shards
    perm = epoch_permutation(n, seed, epoch)[: steps * global_batch]
    mine = perm.reshape(steps, num_shards, per_replica)[:, list(shard_ids), :]
    return mine.reshape(-1, per_replica)


def _normalize(images: tf.Tensor) -> tf.Tensor:
    return (tf.cast(images, tf.float32)[..., None] - PIXEL_OFFSET) / PIXEL_SCALE


def _shift(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random +-2 pixel translation, filled with the background value."""
    background = -PIXEL_OFFSET / PIXEL_SCALE
    padded = tf.pad(images - background, [[0, 0], [2, 2], [2, 2], [0, 0]]) + background
    shape = tf.shape(images)
    return tf.image.stateless_random_crop(padded, shape, seed=seed)


def train_dataset(images: np.ndarray, labels: np.ndarray, *, seed: int, epoch: int, global_batch: int,
                  num_shards: int = 1, shard_ids=(0,), augment: bool = False) -> tf.data.Dataset:
    """Per-replica batches of (float32 images (b, 28, 28, 1), int64 labels (b,)) for one epoch."""
    batches = shard_indices(len(labels), seed, epoch, global_batch, num_shards, shard_ids)
    images_t, labels_t = tf.constant(images), tf.constant(labels)

    def gather(step: tf.Tensor, index: tf.Tensor):
        x = _normalize(tf.gather(images_t, index))
        if augment:
            x = _shift(x, tf.stack([tf.cast(seed * 100003 + epoch, tf.int64), tf.cast(step, tf.int64)]))
        return x, tf.gather(labels_t, index)

    ds = tf.data.Dataset.from_tensor_slices(batches).enumerate()
    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
    return ds.map(lambda x, y: (_normalize(x), y)).prefetch(tf.data.AUTOTUNE)
