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
from mnist_dist.loop import (build_model_and_optimizer, distributed_chunks, make_statistics_sync,  # noqa: E402
                             make_train_step, steps_per_call)

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
data = load(sys.argv[1], val_size=1000, train_limit=2048)
STEPS = 8


def replicas_identical(model):
    return all(len({np.asarray(t).tobytes() for t in v.value.values}) == 1 for v in model.weights)


def run(strategy, per_replica_batch, model_name="lenet5", allreduce="fp32", per_call=1):
    config = TrainConfig(model=model_name, batch_size=per_replica_batch, workers=strategy.num_replicas_in_sync,
                         steps_per_execution=per_call)
    keras.utils.set_random_seed(7)
    with strategy.scope():
        model, optimizer = build_model_and_optimizer(config, steps_per_epoch=32)
    step = make_train_step(strategy, model, optimizer, global_batch=64,
                           allreduce=allreduce if strategy.num_replicas_in_sync > 1 else "none")
    next_chunk = distributed_chunks(strategy, data, config, 0, 64)
    losses = []  # the last step's loss of each call: every step's, at one step per call
    for steps in steps_per_call(0, STEPS, eval_every=10**9, per_call=per_call):
        losses.append(float(step(next_chunk(steps), steps)[1]))
    assert int(optimizer.iterations.numpy()) == STEPS
    if model_name != "lenet5":
        # Batch norm: each replica's moving statistics follow its own half of the batch until
        # the epoch-end sync averages them.
        before = replicas_identical(model)
        make_statistics_sync(strategy, model)()
        return before, replicas_identical(model)
    identical = replicas_identical(model) if strategy.num_replicas_in_sync > 1 else None
    return losses, identical, [w.numpy() for w in model.weights], strategy.num_replicas_in_sync


single, _, w1, n1 = run(tf.distribute.get_strategy(), 64)
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one: collective keys are per strategy
double, identical, w2, n2 = run(mirrored, 32)
bn_before, bn_after = run(mirrored, 32, "cnn-bn")
bf16_sum, bf16_identical, w3, _ = run(mirrored, 32, allreduce="bf16")
# 3 steps per call: calls of 3, 3 and 2 steps, the last one cut short.
chunked, chunked_identical, w4, _ = run(mirrored, 32, per_call=3)
print(json.dumps({"single": single, "double": double, "replicas": [n1, n2], "replicas_identical": identical,
                  "batch_norm_identical_before_sync": bn_before, "batch_norm_identical_after_sync": bn_after,
                  "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w1, w2)),
                  "chunked": chunked, "chunked_identical": chunked_identical,
                  "chunked_max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w2, w4)),
                  "bf16_allreduce": bf16_sum, "bf16_allreduce_identical": bf16_identical,
                  "bf16_max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w1, w3)),
                  "bf16_mean_weight_diff": float(np.mean([np.abs(a - b).mean() for a, b in zip(w1, w3)]))}))
