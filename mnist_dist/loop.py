"""The training loop, for any tf.distribute strategy.

Keras 3's `model.fit` breaks under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so the step is written out: `strategy.run` computes each replica's loss averaged over
the *global* batch, the Keras optimizer sums the replicas' gradients (an all-reduce)
and applies the same update everywhere. Every step is synchronous.

The loop talks to its surroundings through a `Session` (Ray Train, or a plain
directory) for checkpoints and reports, so the same code runs in one process and on N
Ray workers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol

import numpy as np

from mnist_dist import checkpoint as ckpt
from mnist_dist import gradients, machine, ownership
from mnist_dist.config import TrainConfig
from mnist_dist.data import Mnist, load, synthetic
from mnist_dist.summaries import Summaries
from mnist_dist.summaries import logdir as summaries_logdir


class Session(Protocol):
    rank: int
    world_size: int
    run_dir: str  # where TensorBoard events go (rank 0)

    def latest_checkpoint(self) -> ContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None: ...


class DirectorySession:
    """One process, no Ray: checkpoints go to `run_dir/checkpoint_epochNNN` by rename."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: str | Path):
        self.run_dir = str(run_dir)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        valid = []
        for path in sorted(Path(self.run_dir).glob("checkpoint_epoch*")):
            with contextlib.suppress(ckpt.CheckpointError):
                ckpt.load_state(path)
                valid.append(path)
        yield valid[-1] if valid else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None:
        target = Path(self.run_dir) / f"checkpoint_epoch{epoch:03d}"
        # Staged beside its destination, so the last step is a rename on one filesystem, even
        # when the temporary directory is on another (tmpfs, or the run on NFS).
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.run_dir))
        try:
            for source in Path(checkpoint_dir).iterdir():
                with open(source, "rb") as src, open(staged / source.name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            # An earlier, unusable checkpoint of this epoch (cut off mid-write) is replaced only
            # when it is provably one of ours.
            ownership.replace(staged, target, "checkpoint",
                              fix=f"move {target} out of the run directory, then re-run the same command")
        finally:
            ownership.remove_staging(staged)
        self.reports.append({**metrics, "checkpoint": str(target)})


_FINISHED: list = []  # the last run's input iterator; see train()


class TrainingDiverged(Exception):
    """The loss stopped being a number; the run stops before it saves another checkpoint."""


def check_finite(loss: float, step: int, config: TrainConfig, last_epoch: int) -> None:
    if math.isfinite(loss):
        return
    kept = (f"the last good checkpoint, checkpoint_epoch{last_epoch:03d}, is kept (mnist-dist export --checkpoint RUN/"
            f"checkpoint_epoch{last_epoch:03d})") if last_epoch else "no epoch finished, so no checkpoint was saved"
    raise TrainingDiverged(f"training diverged: the loss is {loss} at step {step} with --lr {config.learning_rate:g}; {kept}. "
                           "Fix: a lower --lr, under a new --name.")


def load_data(config: TrainConfig) -> Mnist:
    if config.synthetic:
        return synthetic(val_size=config.val_size, seed=config.seed, train_limit=config.train_limit)
    return load(config.data_dir, val_size=config.val_size, train_limit=config.train_limit)


def weights_sha256(model) -> str:
    """Digest of every weight (trainable and not) as this replica holds it."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def build_model_and_optimizer(config: TrainConfig, steps_per_epoch: int):
    """Model and optimizer; call inside `strategy.scope()` so variables are mirrored."""
    import keras

    from mnist_dist.models import build

    model = build(config.model, l2=config.l2, precision=config.precision)
    # Counted in global steps (optimizer.iterations), so it decays once per epoch for any worker count.
    schedule = keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate, decay_steps=steps_per_epoch, decay_rate=config.lr_decay, staircase=True)
    optimizer = make_optimizer(config, schedule)
    # Compiling attaches the optimizer, so `model.save` keeps its slots for resumption.
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def make_optimizer(config: TrainConfig, learning_rate):
    """The configured Keras optimizer; `learning_rate` is a float or a schedule."""
    import keras

    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=config.momentum)


def current_lr(optimizer) -> float:
    """The scheduled learning rate at the optimizer's current global step."""
    return float(optimizer.learning_rate.numpy())


def make_train_step(strategy, model, optimizer, global_batch: int, allreduce: str = "fp32") -> Callable:
    """The synchronous train step: local gradients, one collective, one fused update per
    variable (`mnist_dist.gradients`).

    Returns `train_steps(chunk, steps)`: it runs the first `steps` of the batches stacked in
    `chunk` (a distributed (images, labels) of shape [K, local batch, ...], from
    `distributed_chunks`) in one in-graph loop, and returns this worker's share of the
    summed loss, and of the last step's loss and error rate.
    """
    import keras
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    gradients.take_over_gradient_sum(optimizer)
    gradients.fuse_update_step(optimizer, model)
    exchange = gradients.GradientExchange(model, global_batch // replicas, replicas, allreduce)
    variables = model.trainable_variables

    # The penalty's value, for the reported loss; its gradient is added in the update. Not
    # in XLA: its sum of squares took 1.75 ms there, and 1.0 ms on TensorFlow's own kernels.
    def penalty():
        return tf.add_n(model.losses) if model.losses else tf.constant(0.0)

    def replica_step(images, labels, index):
        images, labels = images[index], labels[index]
        with tf.GradientTape() as tape, exchange.recording() as seen:
            logits = tf.cast(model(images, training=True), tf.float32)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        reported = loss + tf.nn.scale_regularization_loss(penalty())  # read before the update
        optimizer.apply_gradients(zip(exchange(tape, loss, seen), variables))
        wrong = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) != labels, tf.float32))
        return reported, wrong

    def local_sum(per_replica):
        return tf.add_n(strategy.experimental_local_results(per_replica))

    @tf.function
    def train_steps(chunk, steps):
        """Shares of this worker, not sums over the workers: two scalar all-reduces a step,
        each a gRPC round trip, cost 2 one-core workers 4-7% of their throughput. The loop
        sums them only when it prints them.
        """
        def one_step(index, total, _loss, _error):
            loss, wrong = strategy.run(replica_step, args=(*chunk, index))
            loss = local_sum(loss)
            return index + 1, total + loss, loss, local_sum(wrong) / global_batch

        zero = tf.constant(0.0)
        # One step at a time: each step's collective and update must follow the last one's.
        _, total, loss, error = tf.while_loop(lambda index, *_: index < steps, one_step,
                                              (tf.constant(0), zero, zero, zero), parallel_iterations=1)
        return total, loss, error

    # A tensor, so that a chunk cut short at a progress line or an epoch end is no retrace.
    return lambda chunk, steps: train_steps(chunk, tf.constant(steps, tf.int32))


def make_statistics_sync(strategy, model) -> Callable[[], None]:
    """Averages the float non-trainable weights (batch-norm moving statistics) over replicas.

    Gradients are all-reduced, but each replica updates its moving statistics from its own
    shard of the batch, so they drift apart. Averaging them at every epoch end, before the
    evaluation and the checkpoint, keeps every worker's model bit-identical.
    """
    import tensorflow as tf

    stats = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
    if not stats or strategy.num_replicas_in_sync == 1:
        return lambda: None

    def local_statistics():
        return tf.concat([tf.reshape(tf.cast(v.value, tf.float32), [-1]) for v in stats], axis=0)

    @tf.function
    def sync():
        # One all-reduce for all of them; `strategy.reduce` is the collective the train step uses.
        means = strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(local_statistics), axis=None)
        for variable, mean in zip(stats, tf.split(means, [int(np.prod(v.shape)) for v in stats])):
            variable.assign(tf.cast(tf.reshape(mean, variable.shape), variable.dtype))

    return sync


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
    totals, so all of them must call it at the same points. Scoring everything on rank 0
    cost a 1-epoch run ~5 s (three validations and the test set on one core) while the
    other workers sat idle; split, it costs 1/N of that.
    """
    import keras
    import tensorflow as tf

    from mnist_dist.pipeline import eval_dataset

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


def steps_per_call(first_step: int, last_step: int, eval_every: int, per_call: int) -> list[int]:
    """How many steps each train-function call runs from `first_step` to `last_step`: at
    most `per_call`, and a call always ends where a progress line is due."""
    sizes, step = [], first_step
    while step < last_step:
        stop = min(step + per_call, last_step, (step // eval_every + 1) * eval_every)
        sizes.append(stop - step)
        step = stop
    return sizes


def distributed_chunks(strategy, data: Mnist, config: TrainConfig, epoch: int, global_batch: int,
                       epochs: int = 1) -> Callable[[int], Any]:
    """`next_chunk(steps)`: the distributed batches of the next `steps` steps of `epochs`
    epochs from `epoch`, stacked and padded to `config.steps_per_execution`, so that every
    train-function call has the same shapes.

    Each local replica reads its slice of every global batch from its own plain tf.data
    iterator, and `experimental_distribute_values_from_function` hands the slices to the
    strategy. With `distribute_datasets_from_function` instead, every step of 2 one-core
    MultiWorkerMirroredStrategy workers took 450 ms instead of 330 ms, even on batches
    fetched in advance: its live iterator alone slowed the step.
    """
    import tensorflow as tf

    from mnist_dist.pipeline import train_dataset

    iterators: dict[int, Iterator] = {}
    per_call = config.steps_per_execution

    def replica_chunk(ctx, steps: int):
        replica = ctx.replica_id_in_sync_group  # global: unique over all workers
        if replica not in iterators:
            iterators[replica] = iter(train_dataset(
                data.train_x, data.train_y, seed=config.seed, epoch=epoch, global_batch=global_batch,
                num_shards=ctx.num_replicas_in_sync, shard_ids=(replica,), augment=config.augment,
                rotate_deg=config.rotate, zoom=config.zoom, epochs=epochs))
        batches = [next(iterators[replica]) for _ in range(steps)]
        batches += batches[-1:] * (per_call - steps)  # never trained on
        return tuple(tf.stack(part) for part in zip(*batches))

    def next_chunk(steps: int):
        if not 1 <= steps <= per_call:
            raise ValueError(f"a chunk holds 1 to {per_call} steps, not {steps}")
        return strategy.experimental_distribute_values_from_function(lambda ctx: replica_chunk(ctx, steps))

    return next_chunk


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch with the highest validation accuracy; the earliest one on a tie."""
    return max(history, key=lambda m: (m["val_accuracy"], -m["epoch"]))["epoch"]


def keep_if_best(model, history, kept: tuple[int, list] | None) -> tuple[int, list] | None:
    """A copy of the weights when the epoch just finished is the best so far."""
    if best_epoch(history) == history[-1]["epoch"]:
        return history[-1]["epoch"], model.get_weights()
    return kept


def score_best(model, history, kept, evaluate, data: Mnist) -> dict[str, Any] | None:
    """Test loss and accuracy of the best epoch's weights, scored where they already are.

    Doing it here spares the driver a TensorFlow import and a checkpoint load. None when
    the best epoch was trained before a resume (its weights are only in the checkpoint);
    the driver then scores that checkpoint itself.
    """
    if kept is None or kept[0] != best_epoch(history):
        return None
    current = model.get_weights()
    model.set_weights(kept[1])
    loss, accuracy = evaluate(data.test_x, data.test_y)
    model.set_weights(current)
    return {"epoch": kept[0], "accuracy": accuracy, "loss": loss}


def train(config: TrainConfig, session: Session, strategy=None, data: Mnist | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train to `config.epochs`, resuming from the session's latest checkpoint; returns the last metrics."""
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    data = data or load_data(config)
    is_chief = session.rank == 0
    say = log if is_chief else (lambda _msg: None)
    # One replica per Ray worker; MirroredStrategy over local devices (tests) has several.
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    steps_per_epoch = len(data.train_y) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train_y)} training images are fewer than one global batch of {global_batch}")

    import keras

    # --seed fixes the initial weights too (worker 0's, which the strategy copies to every
    # replica) and the dropout masks: two runs of one configuration train alike.
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model, optimizer = build_model_and_optimizer(config, steps_per_epoch)
    # One replica has nothing to sum; rounding its gradients would only lose precision.
    allreduce = config.allreduce_dtype if strategy.num_replicas_in_sync > 1 else "none"
    history: list[dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    with session.latest_checkpoint() as restore_dir:
        if restore_dir is not None:
            state = ckpt.restore_into(model, restore_dir)
            start_epoch, history, train_seconds = state["epoch"], state.get("history", []), state.get("train_seconds", 0.0)
            say(f"resumed from {restore_dir}: epoch {start_epoch}, global step {int(optimizer.iterations.numpy())}")
    expected_step = start_epoch * steps_per_epoch
    if int(optimizer.iterations.numpy()) != expected_step:
        raise RuntimeError(f"checkpoint step {int(optimizer.iterations.numpy())} does not match epoch {start_epoch} x {steps_per_epoch} steps")

    if start_epoch == 0:
        say(data.describe())
        say(f"model {config.model}: {model.count_params():,} parameters; {session.world_size} worker(s) x batch "
            f"{config.batch_size} = global batch {global_batch}; {steps_per_epoch} steps/epoch; precision {config.precision}"
            + gradients.describe(model, config.batch_size, strategy.num_replicas_in_sync, allreduce))
        if config.precision == "bf16" and not config.gpus_per_worker and (warning := machine.slow_bf16_warning()):
            say(warning)
    train_step = make_train_step(strategy, model, optimizer, global_batch, allreduce)
    worker_sum = make_worker_sum(strategy, session.world_size)
    evaluate = make_evaluator(model, strategy, session.rank, session.world_size)
    sync_statistics = make_statistics_sync(strategy, model)
    summaries = Summaries(summaries_logdir(session.run_dir) if is_chief else None)
    if start_epoch == 0:
        summaries.graph(model)
    metrics: dict[str, Any] = history[-1] if history else {}
    best_weights: tuple[int, list] | None = None  # (epoch, weights) of the best epoch trained in this process
    # One iterator for every remaining epoch. Under MultiWorkerMirroredStrategy, destroying
    # a tf.data iterator blocked the worker for ~25-50 s (py-spy: `RootDataset::Iterator::
    # ~Iterator` waiting on a thread), so there is no per-epoch teardown, and the last one
    # is parked in `_FINISHED` rather than destroyed on the way out.
    remaining = config.epochs - start_epoch
    next_chunk = distributed_chunks(strategy, data, config, start_epoch, global_batch, remaining)

    for epoch in range(start_epoch, config.epochs):
        epoch_start = interval_start = time.perf_counter()
        eval_seconds = 0.0
        losses, probes = [], []
        interval_steps, step = 0, epoch * steps_per_epoch
        # Exactly steps_per_epoch batches per epoch, the same on every worker, so the loop
        # never needs the distributed iterator's cross-worker end-of-data check.
        for steps in steps_per_call(step, step + steps_per_epoch, config.eval_every, config.steps_per_execution):
            total, loss, error = train_step(next_chunk(steps), steps)
            losses.append(total)
            interval_steps += steps
            # Counted here: reading optimizer.iterations back would wait on the device each step.
            step += steps
            if step % config.eval_every == 0:  # every worker: they score a slice each
                elapsed = time.perf_counter() - interval_start
                eval_start = time.perf_counter()
                loss, error = worker_sum(np.array([float(loss), float(error)], np.float32))
                check_finite(float(loss), step, config, epoch)
                _, val_acc = evaluate(data.val_x, data.val_y)
                if config.probe_test:
                    probes.append({"step": step, "train_seconds": train_seconds + eval_start - epoch_start - eval_seconds,
                                   "test_accuracy": evaluate(data.test_x, data.test_y)[1]})
                eval_seconds += time.perf_counter() - eval_start
                lr = current_lr(optimizer)
                summaries.scalars(step, {"train/loss": float(loss), "train/learning_rate": lr,
                                         "train/minibatch_error": float(error), "val/error": 1 - val_acc,
                                         "val/accuracy": val_acc,
                                         "train/images_per_second": interval_steps * global_batch / elapsed})
                say(f"step {step:6d} (epoch {step / steps_per_epoch:5.2f}) | minibatch loss {float(loss):.4f} | "
                    f"lr {lr:.6f} | minibatch error {100 * float(error):5.2f}% | validation error {100 * (1 - val_acc):5.2f}% | "
                    f"{1000 * elapsed / interval_steps:6.1f} ms/step | {interval_steps * global_batch / elapsed:7.0f} img/s")
                interval_steps, interval_start = 0, time.perf_counter()
        epoch_train_seconds = time.perf_counter() - epoch_start - eval_seconds
        train_seconds += epoch_train_seconds
        sync_statistics()
        val_loss, val_acc = evaluate(data.val_x, data.val_y)
        step = int(optimizer.iterations.numpy())
        lr = current_lr(optimizer)
        metrics = {
            "epoch": epoch + 1, "global_step": step, "val_accuracy": val_acc, "val_loss": val_loss,
            "train_loss": float(worker_sum(np.array([sum(float(x) for x in losses)], np.float32))[0]) / steps_per_epoch,
            "learning_rate": lr,
            "epoch_train_seconds": epoch_train_seconds, "train_seconds": train_seconds,
            "images_per_second": steps_per_epoch * global_batch / epoch_train_seconds,
            "finished_at": time.time(),  # so that a resumed run's time line counts only its own epochs
        }
        check_finite(metrics["train_loss"] + val_loss, step, config, epoch)
        if config.probe_test:
            metrics["test_probes"] = probes + [{"step": step, "train_seconds": train_seconds,
                                                "test_accuracy": evaluate(data.test_x, data.test_y)[1]}]
        history.append(metrics)
        best_weights = keep_if_best(model, history, best_weights)
        if epoch + 1 == config.epochs:
            metrics = {**metrics, "test": score_best(model, history, best_weights, evaluate, data)}
        summaries.scalars(step, {"val/accuracy": val_acc, "val/error": 1 - val_acc, "epoch/val_accuracy": val_acc,
                                 "epoch/val_loss": val_loss, "epoch/train_loss": metrics["train_loss"],
                                 "epoch/images_per_second": metrics["images_per_second"]})
        summaries.sync()
        say(f"epoch {epoch + 1}/{config.epochs}: validation accuracy {100 * val_acc:.2f}% (loss {val_loss:.4f}), "
            f"{epoch_train_seconds:.1f} s, {metrics['images_per_second']:.0f} img/s")
        with tempfile.TemporaryDirectory(prefix="mnist-ckpt-") as tmp:
            out = Path(tmp) / "checkpoint"
            out.mkdir()
            ownership.mark(out, "checkpoint")
            # Every rank leaves its own digest: the run can prove the replicas stayed identical.
            (out / f"replica-{session.rank}.json").write_text(json.dumps({"rank": session.rank, "weights_sha256": weights_sha256(model)}))
            if is_chief:
                ckpt.save(out, model, {**metrics, "history": history, "config": config.to_dict(),
                                       "data_source": data.source, "steps_per_epoch": steps_per_epoch})
            session.report(metrics, out, epoch + 1)
    summaries.close()
    _FINISHED[:] = [next_chunk]  # it holds the iterators
    return {**metrics, "history": history, "steps_per_epoch": steps_per_epoch}
