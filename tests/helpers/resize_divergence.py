"""Why the spot test compares weights at the epoch of the last resize, not later.

`python tests/helpers/resize_divergence.py MNIST_DIR`: the spot test's run in one process
(lenet5, SGD lr 0.05 momentum 0.9, global batch 128, 300 steps an epoch), through train()'s
own step checkpoints and resume, with MirroredStrategy's 2 replicas standing for 2 workers:

- same:    2 replicas, stopped at steps 780 and 860 and resumed on 2 replicas;
- resized: 2 replicas to 780, 1 replica to 860, 2 replicas to the end (the spot run);
- nudged at 780 / 860: 2 replicas throughout, stopped there and resumed with every weight
  moved by N(0, 3e-8), about the size of the resized run's difference at step 860.

Each run's largest weight difference from an uninterrupted 2-replica run, per epoch.
docs/benchmarks.md quotes the output.
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from mnist_dist.config import TrainConfig  # noqa: E402
from mnist_dist.data import load  # noqa: E402
from mnist_dist.loop import Trainer, train  # noqa: E402
from mnist_dist.sessions import DirectorySession  # noqa: E402
from mnist_dist.store import Location  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_loop import StopsAfterStep  # noqa: E402  (dies right after its step checkpoint, as a hard kill would)

EPOCHS = 5


class Nudged(Trainer):
    def resume(self):
        super().resume()
        rng = np.random.default_rng(1)
        for variable in self.model.trainable_variables:
            value = variable.numpy()
            variable.assign(value + rng.normal(0.0, 3e-8, value.shape).astype(np.float32))


def main(mnist_dir: str) -> None:
    data = load(mnist_dir, val_size=1000, train_limit=38400)
    config = TrainConfig(model="lenet5", epochs=EPOCHS, batch_size=64, workers=2, min_workers=1, optimizer="sgd",
                         learning_rate=0.05, train_limit=38400, val_size=1000, eval_every=100, checkpoint_every="20")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.get_strategy()
    quiet = lambda _line: None  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="resize-divergence-"))
    try:
        def legs(name, plan, last=Trainer):
            run = Location.of(root / name)
            for strategy, stop in plan:
                try:
                    train(config, StopsAfterStep(run, stop), strategy=strategy, data=data, log=quiet)
                except StopsAfterStep.Died:
                    pass
            last(config, DirectorySession(run), two, data, quiet).run()

        legs("whole", [])
        legs("same", [(two, 780), (two, 860)])
        legs("resized", [(two, 780), (one, 860)])
        legs("nudged780", [(two, 780)], last=Nudged)
        legs("nudged860", [(two, 860)], last=Nudged)

        def weights(name, epoch):
            path = root / name / f"checkpoint_epoch{epoch:03d}" / "model.keras"
            return keras.models.load_model(path, compile=False).get_weights()

        names = ("same", "resized", "nudged780", "nudged860")
        print("epoch  " + "  ".join(f"{name:>9}" for name in names))
        for epoch in range(1, EPOCHS + 1):
            whole = weights("whole", epoch)
            diffs = [max(float(np.abs(a - b).max()) for a, b in zip(whole, weights(name, epoch)))
                     for name in names]
            print(f"{epoch:5d}  " + "  ".join(f"{d:9.1e}" for d in diffs))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
