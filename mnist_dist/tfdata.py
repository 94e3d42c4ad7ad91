"""tf.data input: every worker walks the same per-epoch permutation and takes its own
slice of each global batch, so the replicas together see each global batch exactly once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from mnist_dist.config import TrainConfig
from mnist_dist.data import PIXEL_OFFSET, PIXEL_SCALE, Mnist


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The same on every worker (same seed), different every epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def replica_slices(global_batch: int, num_shards: int) -> tuple[list[int], int]:
    """Where each replica's slice of a global batch starts, and the rows every replica's batch
    has: ceil(global_batch / num_shards). A count that does not divide the global batch gives
    the first replicas one image more; the others fill their last row with padding (weight 0)."""
    if not 1 <= num_shards <= global_batch:
        raise ValueError(f"global batch {global_batch} cannot be split over {num_shards} replicas")
    size, extra = divmod(global_batch, num_shards)
    starts = [r * size + min(r, extra) for r in range(num_shards)]
    return starts, size + (extra > 0)


def shard_indices(n: int, seed: int, epoch: int, global_batch: int, num_shards: int, shard_ids) -> np.ndarray:
    """Sample indices of some replicas (shards) for one epoch: (steps * len(shard_ids), rows),
    -1 where a row is padding.

    Each global batch is split into `num_shards` consecutive slices, one per replica; a
    pipeline that feeds several local replicas yields their slices in turn. The tail that does
    not fill a whole global batch is dropped, so every worker runs the same number of
    synchronous steps. The global batches are the same for any `num_shards`.
    """
    steps = n // global_batch
    if steps == 0:
        raise ValueError(f"{n} training images are fewer than one global batch of {global_batch}; use a smaller --batch-size")
    starts, rows = replica_slices(global_batch, num_shards)
    perm = np.concatenate([epoch_permutation(n, seed, epoch)[: steps * global_batch].reshape(steps, global_batch),
                           np.full((steps, rows), -1)], axis=1)  # the padding any slice may reach into
    ends = starts[1:] + [global_batch]
    parts = []
    for shard in shard_ids:
        part = perm[:, starts[shard]: starts[shard] + rows].copy()
        part[:, ends[shard] - starts[shard]:] = -1
        parts.append(part)
    return np.stack(parts, axis=1).reshape(-1, rows)


def _normalize(images: tf.Tensor) -> tf.Tensor:
    return (tf.cast(images, tf.float32)[..., None] - PIXEL_OFFSET) / PIXEL_SCALE


def _shift(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random +-2 pixel translation, filled with the background value: one offset for the
    whole global batch, whose seed every replica shares."""
    background = -PIXEL_OFFSET / PIXEL_SCALE
    padded = tf.pad(images - background, [[0, 0], [2, 2], [2, 2], [0, 0]]) + background
    shape = tf.shape(images)
    return tf.image.stateless_random_crop(padded, shape, seed=seed)


def _affine(images: tf.Tensor, seed: tf.Tensor, rotate_deg: float, zoom: float, start=0, global_batch: int | None = None) -> tf.Tensor:
    """Random rotation (+-rotate_deg), zoom (1 +- zoom) and +-2 px shift, in one resampling.

    One projective transform instead of three Keras preprocessing layers: each layer
    would interpolate again and blur the strokes, and these draws are stateless, so a
    resumed epoch sees the same images.
    """
    n = tf.shape(images)[0]
    # One draw per row of the whole global batch (and its padding); this slice takes its own rows.
    total = n if global_batch is None else global_batch + n
    draws = tf.random.stateless_uniform([total, 4], seed=seed, minval=-1.0, maxval=1.0)[start: start + n]
    angle = draws[:, 0] * (rotate_deg * np.pi / 180.0)
    scale = 1.0 + draws[:, 1] * zoom
    shift_x, shift_y = draws[:, 2] * 2.0, draws[:, 3] * 2.0
    # The transform maps each output pixel to the input pixel it samples, about the centre.
    c = (28 - 1) / 2.0
    a0, a1 = tf.cos(angle) / scale, tf.sin(angle) / scale
    b0, b1 = -a1, a0
    a2 = c - a0 * c - a1 * c + shift_x
    b2 = c - b0 * c - b1 * c + shift_y
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=-PIXEL_OFFSET / PIXEL_SCALE, interpolation="BILINEAR", fill_mode="CONSTANT")


def train_dataset(images: np.ndarray, labels: np.ndarray, *, seed: int, epoch: int, global_batch: int,
                  num_shards: int = 1, shard_ids=(0,), augment: bool = False,
                  rotate_deg: float = 0.0, zoom: float = 0.0, epochs: int = 1, skip_steps: int = 0) -> tf.data.Dataset:
    """Per-replica batches of (float32 images (b, 28, 28, 1), int64 labels (b,), float32 weights
    (b,): 0 on padding rows) for `epochs` consecutive epochs from `epoch`, each with its own
    permutation and augmentation, less the first `skip_steps` steps (a run resumed mid-epoch)."""
    per_epoch = [shard_indices(len(labels), seed, e, global_batch, num_shards, shard_ids)
                 for e in range(epoch, epoch + epochs)]
    starts, rows = replica_slices(global_batch, num_shards)
    local = len(shard_ids)
    steps = len(per_epoch[0]) // local
    batches = np.concatenate(per_epoch)[skip_steps * local:]
    # Each row's epoch, step in its epoch, and where its slice starts in the global batch.
    row = np.arange(skip_steps * local, epochs * steps * local)
    epoch_of, step_of = epoch + row // (steps * local), (row // local) % steps
    start_of = np.array(starts)[np.array(list(shard_ids))[row % local]]
    images_t, labels_t = tf.constant(images), tf.constant(labels)

    def gather(index: tf.Tensor, this_epoch: tf.Tensor, step: tf.Tensor, start: tf.Tensor):
        x = _normalize(tf.gather(images_t, tf.maximum(index, 0)))
        if augment:
            # Seeded by the global batch and drawn for all of it, so that an image is
            # augmented alike whichever replica, and however many, train it.
            step_seed = tf.stack([seed * 100003 + this_epoch, step])
            x = _affine(x, step_seed, rotate_deg, zoom, start, global_batch) if (rotate_deg or zoom) else _shift(x, step_seed)
        return x, tf.gather(labels_t, tf.maximum(index, 0)), tf.cast(index >= 0, tf.float32)

    ds = tf.data.Dataset.from_tensor_slices((batches, epoch_of.astype(np.int64), step_of.astype(np.int64),
                                             start_of.astype(np.int32)))
    return without_autotune(ds.map(gather, num_parallel_calls=2, deterministic=True).prefetch(2))


def eval_dataset(images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
    return without_autotune(ds.map(lambda x, y: (_normalize(x), y)).prefetch(1))


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Fixed parallelism and buffers instead of tf.data's autotuner.

    A batch of MNIST needs no tuning, and the autotuner adds a background thread to every
    iterator on workers that own one core each (docs/design.md#the-input-pipeline).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def distributed_chunks(strategy, data: Mnist, config: TrainConfig, epoch: int, global_batch: int,
                       epochs: int = 1, skip_steps: int = 0) -> Callable[[int], Any]:
    """`next_chunk(steps)`: the distributed batches of the next `steps` steps of `epochs`
    epochs from `epoch` (less its first `skip_steps`), stacked and padded to `config.steps_per_execution`, so that every
    train-function call has the same shapes.

    Each local replica reads its slice of every global batch from its own plain tf.data
    iterator, and `experimental_distribute_values_from_function` hands the slices to the
    strategy. `distribute_datasets_from_function`'s live iterator alone slowed every step,
    even on batches fetched in advance (docs/design.md#the-input-pipeline).
    """
    iterators: dict[int, Iterator] = {}
    per_call = config.steps_per_execution

    def replica_chunk(ctx, steps: int):
        replica = ctx.replica_id_in_sync_group  # global: unique over all workers
        if replica not in iterators:
            iterators[replica] = iter(train_dataset(
                data.train_x, data.train_y, seed=config.seed, epoch=epoch, global_batch=global_batch,
                num_shards=ctx.num_replicas_in_sync, shard_ids=(replica,), augment=config.augment,
                rotate_deg=config.rotate, zoom=config.zoom, epochs=epochs, skip_steps=skip_steps))
        batches = [next(iterators[replica]) for _ in range(steps)]
        batches += batches[-1:] * (per_call - steps)  # never trained on
        return tuple(tf.stack(part) for part in zip(*batches))

    def next_chunk(steps: int):
        if not 1 <= steps <= per_call:
            raise ValueError(f"a chunk holds 1 to {per_call} steps, not {steps}")
        return strategy.experimental_distribute_values_from_function(lambda ctx: replica_chunk(ctx, steps))

    return next_chunk
