"""What a user runs instead of mnist-dist: Keras `fit` under MultiWorkerMirroredStrategy,
with tf_keras (TF_USE_LEGACY_KERAS=1), since Keras 3's `fit` fails under it
(keras-team/keras#20585, ray-project/ray#47464).

Run by the peer venv's Python (the `bench-peer` lock), never imported by mnist_dist:

    python -P legacy_keras_peer.py ray|tf-config ARGUMENTS_JSON STORAGE

- `ray`: Ray's documented example (ray/train/examples/tf/tensorflow_mnist_example.py):
  `TensorflowTrainer`, one worker per `num_workers`, `fit` with Ray's
  `ReportCheckpointCallback`.
- `tf-config`: TensorFlow's own multi-worker recipe: this process is one worker of the
  cluster that TF_CONFIG names; rank 0 prints the result.

Both train 2 epochs of `steps` global batches on the images the bench hands over, and time
each epoch from Keras' callbacks; the second epoch is the measured one. The last line of
stdout is one JSON object.
"""
import json
import os
import sys
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"


def build(name, l2, precision):
    """mnist_dist.models' builders, layer for layer, in tf_keras (the bench checks the counts)."""
    import tensorflow as tf

    layers = tf.keras.layers
    if precision == "bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    # mnist_dist.models.keras_l2: the tutorial's l2 * tf.nn.l2_loss is Keras' L2(l2 / 2).
    reg = tf.keras.regularizers.L2(l2 / 2) if l2 else None

    def dense(units, **kwargs):
        return layers.Dense(units, kernel_regularizer=reg, bias_regularizer=reg, **kwargs)

    logits = dense(10, dtype="float32", name="logits")
    if name == "tf-tutorial":
        body = [layers.Conv2D(32, 5, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(64, 5, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Flatten(), dense(512), layers.ReLU(), layers.Dropout(0.5)]
    elif name == "lenet5":
        body = [layers.Conv2D(6, 5, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(16, 5, padding="valid", activation="relu"), layers.MaxPooling2D(2),
                layers.Flatten(), dense(120), layers.ReLU(), dense(84), layers.ReLU()]
    else:
        raise SystemExit(f"the peer builds tf-tutorial and lenet5, not {name}")
    return tf.keras.Sequential([tf.keras.Input((28, 28, 1)), *body, logits])


def dataset(args):
    """Ray's example's pipeline (shuffle, repeat, batch by the global batch) over the bench's images."""
    import numpy as np
    import tensorflow as tf

    with np.load(args["data"]) as data:
        x = ((data["x"].astype(np.float32) - args["pixel_offset"]) / args["pixel_scale"])[..., None]
        y = data["y"].astype(np.int64)
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x)).repeat().batch(args["global_batch"])


def train(args, callbacks=()):
    """The body of Ray's example's `train_func`: returns each epoch's seconds."""
    import tensorflow as tf

    class EpochTimer(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)
            if logs is not None:  # Ray's callback, next in the list, reports these
                logs.update(epoch_seconds=self.seconds[-1], train_seconds=sum(self.seconds), params=self.model.count_params())

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    train_dataset = dataset(args)
    with strategy.scope():
        model = build(args["model"], args["l2"], args["precision"])
        model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=tf.keras.optimizers.Adam(learning_rate=args["learning_rate"]))
    timer = EpochTimer()
    model.fit(train_dataset, epochs=2, steps_per_epoch=args["steps"], callbacks=[timer, *callbacks], verbose=0)
    return timer.seconds, model.count_params()


def summary(epoch_seconds, params, args, **extra):
    return {"img_s": args["steps"] * args["global_batch"] / epoch_seconds[-1], "epoch_seconds": epoch_seconds,
            "train_seconds": sum(epoch_seconds), "params": params, **extra}


def ray_train_func(args):
    from ray.air.integrations.keras import ReportCheckpointCallback

    train(args, callbacks=[ReportCheckpointCallback(metrics=["epoch_seconds", "train_seconds", "params"])])


def main():
    mode, args, storage = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    if mode == "ray":
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer

        ray.init(address="local")  # a Ray of its own, never a cluster a `ray start` left running
        trainer = TensorflowTrainer(
            train_loop_per_worker=ray_train_func, train_loop_config=args,
            scaling_config=ScalingConfig(num_workers=args["workers"], resources_per_worker={"CPU": args["cpus_per_worker"]}),
            run_config=RunConfig(storage_path=storage, name="peer"))
        result = trainer.fit()
        metrics = result.metrics
        seconds = [metrics["train_seconds"] - metrics["epoch_seconds"], metrics["epoch_seconds"]]
        ray.shutdown()
        print(json.dumps(summary(seconds, metrics["params"], args, checkpoint=bool(result.checkpoint))), flush=True)
    else:
        seconds, params = train(args)
        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
            print(json.dumps(summary(seconds, params, args)), flush=True)


if __name__ == "__main__":
    main()
