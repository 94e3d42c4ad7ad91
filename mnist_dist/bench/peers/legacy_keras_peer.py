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

Both train `epochs` epochs of `steps` global batches on the images the bench hands over, and
time each epoch from Keras' callbacks. With `convert`, the usual script after training
follows: the model to ONNX with tf2onnx, and ONNX Runtime over the test set. The last line
of stdout is one JSON object.
"""
import json
import os
import sys
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
if os.environ.get("PEER_CORES"):  # the TF_CONFIG workers' own cores, set before TensorFlow starts its threads
    os.sched_setaffinity(0, {int(core) for core in os.environ["PEER_CORES"].split(",")})


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


def images(args, x_key, y_key):
    import numpy as np

    with np.load(args["data"]) as data:
        x = ((data[x_key].astype(np.float32) - args["pixel_offset"]) / args["pixel_scale"])[..., None]
        return x, data[y_key].astype(np.int64)


def dataset(args):
    """Ray's example's pipeline (shuffle, repeat, batch by the global batch) over the bench's images."""
    import tensorflow as tf

    x, y = images(args, "x", "y")
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x)).repeat().batch(args["global_batch"])


def train(args, callbacks=()):
    """The body of Ray's example's `train_func`, with the bench's recipe: returns each epoch's
    training seconds, the parameter count, and the test-accuracy probes."""
    import numpy as np
    import tensorflow as tf

    test_x, test_y = images(args, "test_x", "test_y") if args["probe_every"] else (None, None)

    class Timer(tf.keras.callbacks.Callback):
        """Each epoch's seconds, less the probes' (they are not training); every worker probes
        alike, so that none waits for another at the next step's all-reduce."""

        def on_train_begin(self, logs=None):
            self.seconds, self.probes, self.step = [], [], 0

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.probing = time.perf_counter(), 0.0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if args["probe_every"] and (self.step % args["probe_every"] == 0 or batch + 1 == args["steps"]):
                began = time.perf_counter()
                trained = sum(self.seconds) + began - self.start - self.probing
                predicted = np.concatenate([np.argmax(self.model(test_x[i:i + 1000], training=False), -1)
                                            for i in range(0, len(test_x), 1000)])
                self.probing += time.perf_counter() - began
                self.probes.append({"step": self.step, "train_seconds": trained,
                                    "test_accuracy": float(np.mean(predicted == test_y))})

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start - self.probing)
            if logs is not None:  # Ray's callback, next in the list, reports these
                logs.update(epoch_seconds=json.dumps(self.seconds), probes=json.dumps(self.probes),
                            params=self.model.count_params())

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    train_dataset = dataset(args)
    with strategy.scope():
        model = build(args["model"], args["l2"], args["precision"])
        # Decayed once per epoch, as the project's ExponentialDecay(staircase=True) over global steps.
        rate = tf.keras.optimizers.schedules.ExponentialDecay(args["learning_rate"], decay_steps=args["steps"],
                                                              decay_rate=args["lr_decay"], staircase=True)
        optimizer = (tf.keras.optimizers.Adam(learning_rate=rate) if args["optimizer"] == "adam" else
                     tf.keras.optimizers.SGD(learning_rate=rate, momentum=args["momentum"]))
        model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=optimizer)
    timer = Timer()
    model.fit(train_dataset, epochs=args["epochs"], steps_per_epoch=args["steps"], callbacks=[timer, *callbacks], verbose=0)
    return timer.seconds, model.count_params(), timer.probes, model


def summary(epoch_seconds, params, probes, args, **extra):
    """The measured epoch is the last one."""
    return {"img_s": args["steps"] * args["global_batch"] / epoch_seconds[-1], "epoch_seconds": epoch_seconds,
            "train_seconds": sum(epoch_seconds), "params": params, "probes": probes, "steps": args["steps"], **extra}


def ray_train_func(args):
    from ray.train.tensorflow.keras import ReportCheckpointCallback

    train(args, callbacks=[ReportCheckpointCallback(metrics=["epoch_seconds", "probes", "params"])])


def fit_with_ray(args, storage):
    """Ray's example: a TensorflowTrainer of `workers` workers on a Ray of its own."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    ray.init(address="local")  # a Ray of its own, never a cluster a `ray start` left running
    trainer = TensorflowTrainer(
        train_loop_per_worker=ray_train_func, train_loop_config=args,
        scaling_config=ScalingConfig(num_workers=args["workers"], resources_per_worker={"CPU": args["cpus_per_worker"]}),
        run_config=RunConfig(storage_path=storage, name="peer"))
    result = trainer.fit()
    ray.shutdown()
    metrics = result.metrics
    return result, summary(json.loads(metrics["epoch_seconds"]), metrics["params"], json.loads(metrics["probes"]), args,
                           checkpoint=bool(result.checkpoint))


def convert_and_check(args, model, storage):
    """The usual script after training: the model to ONNX with tf2onnx.convert.from_keras,
    then ONNX Runtime over the whole test set against tf_keras."""
    import numpy as np
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    path = os.path.join(storage, "model.onnx")
    tf2onnx.convert.from_keras(model, input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32, name="image")],
                               opset=17, output_path=path)
    x, y = images(args, "test_x", "test_y")
    expected = np.argmax(model.predict(x, batch_size=1000, verbose=0), -1)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = np.argmax(session.run(None, {session.get_inputs()[0].name: x})[0], -1)
    return {"onnx_accuracy": float(np.mean(got == y)), "disagreements": int(np.sum(got != expected)),
            "onnx_bytes": os.path.getsize(path)}


def main():
    mode, args, storage = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    if mode == "ray":
        result, figures = fit_with_ray(args, storage)
        if args["convert"]:  # the last checkpoint, as Ray's callback saved it
            from ray.train.tensorflow import TensorflowCheckpoint

            converting = time.perf_counter()
            model = TensorflowCheckpoint.from_directory(result.checkpoint.path).get_model()
            figures.update(convert_and_check(args, model, storage), convert_seconds=time.perf_counter() - converting)
    else:
        seconds, params, probes, model = train(args)
        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] != 0:
            return
        figures = summary(seconds, params, probes, args)
        if args["convert"]:
            converting = time.perf_counter()
            figures.update(convert_and_check(args, model, storage), convert_seconds=time.perf_counter() - converting)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
