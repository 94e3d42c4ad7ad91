import numpy as np
import pytest

from mnist_dist.tfdata import eval_dataset, shard_indices, train_dataset


def test_workers_split_each_global_batch_disjointly():
    n, gb, workers = 1000, 64, 4
    parts = [shard_indices(n, seed=1, epoch=0, global_batch=gb, num_shards=workers, shard_ids=[w]) for w in range(workers)]
    assert all(p.shape == (n // gb, gb // workers) for p in parts)
    for step in range(n // gb):
        together = np.concatenate([p[step] for p in parts])
        assert len(set(together)) == gb  # distinct parts of one global batch...
    everything = np.concatenate([p.ravel() for p in parts])
    assert len(set(everything)) == (n // gb) * gb  # ...and no sample twice in an epoch


def test_same_global_batches_whatever_the_worker_count():
    one = shard_indices(1000, 3, 0, 64, num_shards=1, shard_ids=[0])
    two = [shard_indices(1000, 3, 0, 64, num_shards=2, shard_ids=[w]) for w in range(2)]
    assert np.array_equal(one, np.concatenate(two, axis=1))
    # One pipeline feeding two local replicas yields their slices in turn.
    local = shard_indices(1000, 3, 0, 64, num_shards=2, shard_ids=[0, 1])
    assert np.array_equal(local[0], two[0][0]) and np.array_equal(local[1], two[1][0])


def test_shuffle_changes_every_epoch_but_not_between_workers():
    a0 = shard_indices(1000, 5, 0, 50, 2, [0])
    assert np.array_equal(a0, shard_indices(1000, 5, 0, 50, 2, [0]))
    assert not np.array_equal(a0, shard_indices(1000, 5, 1, 50, 2, [0]))


def test_batch_must_fit():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        shard_indices(10, 0, 0, 64, 1, [0])


def test_train_dataset_normalizes_and_augments():
    images = np.full((256, 28, 28), 255, np.uint8)
    images[:, :2, :] = 0
    labels = np.arange(256) % 10
    x, y, w = next(iter(train_dataset(images, labels, seed=0, epoch=0, global_batch=64)))
    assert x.shape == (64, 28, 28, 1) and y.shape == (64,) and w.numpy().tolist() == [1.0] * 64
    assert float(x.numpy().max()) == pytest.approx(0.5) and float(x.numpy().min()) == pytest.approx(-0.5)
    shifted, *_ = next(iter(train_dataset(images, labels, seed=0, epoch=0, global_batch=64, augment=True)))
    assert not np.array_equal(shifted.numpy(), x.numpy())
    assert set(np.unique(np.round(shifted.numpy(), 4))) <= {-0.5, 0.5}
    ex, ey = next(iter(eval_dataset(images, labels, batch=100)))
    assert ex.shape == (100, 28, 28, 1)


def test_rotation_and_zoom_are_stateless_and_keep_the_digit():
    rng = np.random.default_rng(0)
    images = np.zeros((128, 28, 28), np.uint8)
    images[:, 8:20, 12:16] = 255  # a bar in the middle: it must stay in the frame
    labels = rng.integers(0, 10, 128)

    def first_batch(seed, epoch):
        return next(iter(train_dataset(images, labels, seed=seed, epoch=epoch, global_batch=64, augment=True,
                                       rotate_deg=10, zoom=0.1)))[0].numpy()

    a, b, other_epoch = first_batch(0, 0), first_batch(0, 0), first_batch(0, 1)
    plain = next(iter(train_dataset(images, labels, seed=0, epoch=0, global_batch=64)))[0].numpy()
    assert np.array_equal(a, b), "a resumed epoch sees the same augmented images"
    assert not np.array_equal(a, other_epoch) and not np.array_equal(a, plain)
    assert a.min() >= -0.5 - 1e-6 and a.max() <= 0.5 + 1e-6
    ink = (a + 0.5).sum(axis=(1, 2, 3)) / (plain + 0.5).sum(axis=(1, 2, 3))
    assert np.all((ink > 0.7) & (ink < 1.3)), "rotation by <= 10 degrees and zoom by <= 10% keep the stroke"


@pytest.mark.parametrize("field, value", [("rotate", -1.0), ("rotate", 90.0), ("zoom", 0.5)])
def test_augmentation_ranges_are_checked(field, value):
    from mnist_dist.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value}).validate()


def test_input_pipelines_run_without_the_autotuner():
    # Fixed parallelism: one background tuning thread fewer per iterator (tfdata.without_autotune).
    images, labels = np.zeros((256, 28, 28), np.uint8), np.zeros(256, np.int64)
    for ds in (train_dataset(images, labels, seed=0, epoch=0, global_batch=64, augment=True),
               eval_dataset(images, labels)):
        assert ds.options().autotune.enabled is False


def test_one_dataset_for_several_epochs_equals_the_epochs_one_by_one():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (320, 28, 28), dtype=np.uint8), rng.integers(0, 10, 320)
    common = dict(seed=3, global_batch=64, augment=True, rotate_deg=10.0, zoom=0.1)
    joined = list(train_dataset(images, labels, epoch=1, epochs=2, **common).as_numpy_iterator())
    single = [b for e in (1, 2) for b in train_dataset(images, labels, epoch=e, **common).as_numpy_iterator()]
    assert len(joined) == len(single) == 10
    for (x1, y1, _), (x2, y2, _) in zip(joined, single):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x2)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_any_worker_count_trains_the_same_global_batches_padding_the_rest(workers):
    # 64 over 3 workers: slices of 22, 21 and 21 images, each padded to 22 rows with -1.
    gb = 64
    parts = [shard_indices(1000, 3, 0, gb, num_shards=workers, shard_ids=[w]) for w in range(workers)]
    rows = -(-gb // workers)
    assert all(p.shape == (1000 // gb, rows) for p in parts)
    one = shard_indices(1000, 3, 0, gb, num_shards=1, shard_ids=[0])
    for step in range(1000 // gb):
        real = np.concatenate([p[step][p[step] >= 0] for p in parts])
        assert np.array_equal(real, one[step])  # the same images, in the same order
    assert sum(int((p < 0).sum()) for p in parts) == (1000 // gb) * (rows * workers - gb)


def test_a_slice_is_augmented_alike_whichever_replica_trains_it():
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (192, 28, 28), dtype=np.uint8), rng.integers(0, 10, 192)
    common = dict(seed=4, epoch=0, global_batch=64, augment=True, rotate_deg=10.0, zoom=0.1)
    whole = [x[w > 0] for x, _, w in train_dataset(images, labels, **common).as_numpy_iterator()]
    split = [[x[w > 0] for x, _, w in train_dataset(images, labels, num_shards=3, shard_ids=[r], **common).as_numpy_iterator()]
             for r in range(3)]
    for step, expected in enumerate(whole):
        np.testing.assert_allclose(np.concatenate([split[r][step] for r in range(3)]), expected, atol=1e-6)


def test_a_dataset_resumed_mid_epoch_continues_where_the_step_left_off():
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (320, 28, 28), dtype=np.uint8), rng.integers(0, 10, 320)
    common = dict(seed=3, global_batch=64, augment=True, epoch=0, epochs=2)
    full = list(train_dataset(images, labels, **common).as_numpy_iterator())
    resumed = list(train_dataset(images, labels, skip_steps=3, **common).as_numpy_iterator())
    assert len(resumed) == len(full) - 3
    for (x1, y1, _), (x2, y2, _) in zip(full[3:], resumed):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x2)
