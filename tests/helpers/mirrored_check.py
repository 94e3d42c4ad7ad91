"""Run in a fresh process (logical CPU devices must be set before TensorFlow starts):
the same global batches through 1 replica and through MirroredStrategy's 2 replicas."""
import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mnist_dist.config import TrainConfig  # noqa: E402
from mnist_dist.data import load  # noqa: E402
from mnist_dist.step import build_model_and_optimizer, make_statistics_sync, make_train_step, steps_per_call  # noqa: E402
from mnist_dist.tfdata import distributed_chunks  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
data = load(sys.argv[1], val_size=1000, train_limit=2048)
STEPS = 8
L2_UPDATES = []  # [replicas, penalized variables, variable copies whose update added the L2 gradient] per run
LR = {"adam": 0.002, "sgd": 0.05}  # the default preset's and the smoke preset's


def replicas_identical(model):
    return all(len({np.asarray(t).tobytes() for t in v.value.values}) == 1 for v in model.weights)


def run(strategy, per_replica_batch, model_name="lenet5", allreduce="fp32", per_call=1, optimizer="adam"):
    config = TrainConfig(model=model_name, batch_size=per_replica_batch, workers=strategy.num_replicas_in_sync,
                         steps_per_execution=per_call, optimizer=optimizer, learning_rate=LR[optimizer])
    keras.utils.set_random_seed(7)
    with strategy.scope():
        model, optimizer = build_model_and_optimizer(config, steps_per_epoch=32)
    initial = [w.numpy() for w in model.weights]
    step = make_train_step(strategy, model, optimizer, global_batch=64,
                           allreduce=allreduce if strategy.num_replicas_in_sync > 1 else "none")
    next_chunk = distributed_chunks(strategy, data, config, 0, 64)
    losses = []  # the last step's loss of each call: every step's, at one step per call
    for steps in steps_per_call(0, STEPS, eval_every=10**9, per_call=per_call):
        losses.append(float(step(next_chunk(steps), steps)[1]))
    assert int(optimizer.iterations.numpy()) == STEPS
    penalized = sum(getattr(v, "regularizer", None) is not None for v in model.trainable_variables)
    L2_UPDATES.append([strategy.num_replicas_in_sync, penalized, optimizer.penalized_updates()])
    if model_name != "lenet5":
        # Batch norm: each replica's moving statistics follow its own half of the batch until
        # the epoch-end sync averages them.
        before = replicas_identical(model)
        make_statistics_sync(strategy, model)()
        return before, replicas_identical(model)
    identical = replicas_identical(model) if strategy.num_replicas_in_sync > 1 else None
    return losses, identical, [w.numpy() for w in model.weights], initial


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def mean_diff(a, b):
    """The mean over variables of each one's mean difference."""
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, b)]))


def mean_over_weights(a, b):
    """The mean over all the weights: a handful of them far apart barely moves it."""
    return float(np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)]).mean())


single, _, w1, _ = run(tf.distribute.get_strategy(), 64)
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one: collective keys are per strategy
double, identical, w2, _ = run(mirrored, 32)
# SGD's update is linear in the gradient: the runs' weights differ by the summed gradients'
# rounding times the learning rate, a bound that holds on any CPU (Adam's does not, see the test).
sgd_single, _, s1, s0 = run(tf.distribute.get_strategy(), 64, optimizer="sgd")
sgd_double, sgd_identical, s2, _ = run(mirrored, 32, optimizer="sgd")
bn_before, bn_after = run(mirrored, 32, "cnn-bn")
bf16_sum, bf16_identical, w3, _ = run(mirrored, 32, allreduce="bf16")
# 3 steps per call: calls of 3, 3 and 2 steps, the last one cut short.
chunked, chunked_identical, w4, _ = run(mirrored, 32, per_call=3)
print(json.dumps({"l2_updates": L2_UPDATES, "single": single, "double": double, "replicas": [1, mirrored.num_replicas_in_sync], "replicas_identical": identical,
                  "batch_norm_identical_before_sync": bn_before, "batch_norm_identical_after_sync": bn_after,
                  "max_weight_diff": max_diff(w1, w2), "mean_weight_diff": mean_over_weights(w1, w2),
                  "sgd_single": sgd_single, "sgd_double": sgd_double, "sgd_replicas_identical": sgd_identical,
                  "sgd_max_weight_diff": max_diff(s1, s2), "sgd_max_movement": max_diff(s1, s0),
                  "chunked": chunked, "chunked_identical": chunked_identical,
                  "chunked_max_weight_diff": max_diff(w2, w4),
                  "bf16_allreduce": bf16_sum, "bf16_allreduce_identical": bf16_identical,
                  "bf16_max_weight_diff": max_diff(w1, w3), "bf16_mean_weight_diff": mean_diff(w1, w3)}))
