"""The synchronous train step and what every replica must do alike around it.

Keras 3's `model.fit` breaks under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so the step is written out: `strategy.run` computes each replica's loss averaged over the
*global* batch, the replicas exchange their gradients (mnist_dist.gradients), and every
replica applies the same update. Every step is synchronous.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from mnist_dist import gradients
from mnist_dist.config import TrainConfig


def build_model_and_optimizer(config: TrainConfig, steps_per_epoch: int):
    """Model and the train step's optimizer; call inside `strategy.scope()` so variables are mirrored."""
    import keras

    from mnist_dist.models import build
    from mnist_dist.optimizers import make_optimizer

    model = build(config.model, l2=config.l2, precision=config.precision)
    # Counted in global steps (optimizer.iterations), so it decays once per epoch for any worker count.
    schedule = keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate, decay_steps=steps_per_epoch, decay_rate=config.lr_decay, staircase=True)
    optimizer = make_optimizer(config, schedule, for_step=True)
    # Compiling attaches the optimizer, so `model.save` keeps its slots for resumption.
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def current_lr(optimizer) -> float:
    """The scheduled learning rate at the optimizer's current global step."""
    return float(optimizer.learning_rate.numpy())


def distillation_loss(labels, logits, teacher_logits, distill: float, temperature: float):
    """Per example: (1 - distill) x cross-entropy on the labels + distill x T² x KL(teacher || student)
    at temperature T (Hinton et al., 2015: T² keeps the soft term's gradients at the labels' scale)."""
    import keras
    import tensorflow as tf

    hard = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    soft_teacher = tf.nn.softmax(teacher_logits / temperature)
    soft = tf.reduce_sum(soft_teacher * (tf.nn.log_softmax(teacher_logits / temperature)
                                         - tf.nn.log_softmax(logits / temperature)), axis=-1)
    return (1.0 - distill) * hard + distill * temperature**2 * soft


def make_train_step(strategy, model, optimizer, global_batch: int, allreduce: str = "fp32", teacher=None,
                    distill: float = 0.0, temperature: float = 1.0) -> Callable:
    """The synchronous train step: local gradients, one collective, one fused update per
    variable (`mnist_dist.gradients`). With a `teacher` (a Keras model, frozen), the loss is
    `distillation_loss` of its logits on the same images.

    Returns `train_steps(chunk, steps)`: it runs the first `steps` of the batches stacked in
    `chunk` (a distributed (images, labels, weights) of shape [K, local batch, ...], from
    `distributed_chunks`) in one in-graph loop, and returns this worker's share of the
    summed loss, and of the last step's loss and error rate.
    """
    import keras
    import tensorflow as tf

    from mnist_dist.tfdata import replica_slices

    replicas = strategy.num_replicas_in_sync
    exchange = gradients.GradientExchange(model, replica_slices(global_batch, replicas)[1], replicas, allreduce)
    optimizer.add_l2_gradients(model, strategy)
    variables = model.trainable_variables

    # The penalty's value, for the reported loss only; the optimizer adds its gradient.
    def penalty():
        return tf.add_n(model.losses) if model.losses else tf.constant(0.0)

    def replica_step(images, labels, weights, index):
        images, labels, weights = images[index], labels[index], weights[index]
        if teacher is not None:  # outside the tape: nothing flows back into the teacher
            taught = tf.cast(teacher(images, training=False), tf.float32)
        with tf.GradientTape() as tape:
            logits, taps = exchange.forward(images, training=True)
            logits = tf.cast(logits, tf.float32)
            if teacher is None:
                per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            else:
                per_example = distillation_loss(labels, logits, taught, distill, temperature)
            # Padding rows (weight 0) of a global batch that N does not divide add nothing.
            per_example = per_example * weights
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        reported = loss + tf.nn.scale_regularization_loss(penalty())  # read before the update
        optimizer.apply_gradients(zip(exchange(tape, loss, taps), variables))
        wrong = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) != labels, tf.float32) * weights)
        return reported, wrong

    def local_sum(per_replica):
        return tf.add_n(strategy.experimental_local_results(per_replica))

    @tf.function
    def train_steps(chunk, steps):
        """Shares of this worker, not sums over the workers: two scalar all-reduces a step
        are two gRPC round trips, a measurable share of a one-core worker's step
        (docs/benchmarks.md#the-log-every-measured-row). The loop sums them only when it prints them.
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


def steps_per_call(first_step: int, last_step: int, eval_every: int, per_call: int, checkpoint_every: int = 0) -> list[int]:
    """How many steps each train-function call runs from `first_step` to `last_step`: at
    most `per_call`, and a call always ends where a progress line or a step checkpoint
    counted in steps is due."""
    sizes, step = [], first_step
    while step < last_step:
        stop = min(step + per_call, last_step, (step // eval_every + 1) * eval_every)
        if checkpoint_every:
            stop = min(stop, (step // checkpoint_every + 1) * checkpoint_every)
        sizes.append(stop - step)
        step = stop
    return sizes


def weights_sha256(model) -> str:
    """Digest of every weight (trainable and not) as this replica holds it."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()
