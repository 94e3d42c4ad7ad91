import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_dist.config import TrainConfig
from mnist_dist.loop import train
from mnist_dist.sessions import DirectorySession
from mnist_dist.store import Location


@pytest.fixture(scope="module")
def mirrored(mnist_dir):
    """The same global batches through 1 replica and through MirroredStrategy's 2 replicas
    (tests/helpers/mirrored_check.py, in a fresh process), shared by the tests below."""
    helper = Path(__file__).parent / "helpers" / "mirrored_check.py"
    proc = subprocess.run([sys.executable, str(helper), str(mnist_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # trains, starts Ray or exports
def test_two_replicas_hold_bit_identical_weights(mirrored):
    assert mirrored["replicas"] == [1, 2]
    assert mirrored["replicas_identical"] is True
    assert mirrored["sgd_replicas_identical"] is True


@pytest.mark.slow  # trains, starts Ray or exports
def test_every_replicas_copy_of_a_penalized_weight_gets_its_l2_gradient(mirrored):
    # The optimizer finds each copy by identity (optimizers.XlaUpdates): a copy it missed
    # would train without its penalty, silently.
    for replicas, penalized, updated in mirrored["l2_updates"]:
        assert penalized > 0 and updated == replicas * penalized, mirrored["l2_updates"]
    assert {replicas for replicas, _, _ in mirrored["l2_updates"]} == {1, 2}


@pytest.mark.slow  # trains, starts Ray or exports
def test_batch_norm_statistics_drift_apart_until_the_epoch_end_sync(mirrored):
    assert mirrored["batch_norm_identical_before_sync"] is False
    assert mirrored["batch_norm_identical_after_sync"] is True


# Same global batch, loss averaged over it, gradients summed over replicas: the same run,
# up to the order in which float32 adds up 64 images' gradients (each sum within about
# 64 ulps, some 4e-6 of its size). The bounds below follow from that arithmetic, on any CPU.
@pytest.mark.slow  # trains, starts Ray or exports
def test_with_sgd_two_replicas_train_one_replicas_weights(mirrored):
    # SGD's update is linear in the gradient, so the weights differ by that rounding times
    # the learning rate, compounded over 8 steps: far below 1e-3 of how far the weights
    # moved (1e-6 measured on AVX2, AVX-512 and TensorFlow's own kernels). A sum missing a
    # replica's share, or counting one twice, is off by a large part of the movement.
    np.testing.assert_allclose(mirrored["sgd_double"], mirrored["sgd_single"], rtol=1e-5)
    assert mirrored["sgd_max_weight_diff"] <= 1e-3 * mirrored["sgd_max_movement"]


@pytest.mark.slow  # trains, starts Ray or exports
def test_with_adam_two_replicas_train_one_replicas_weights(mirrored):
    # Adam divides by the gradient's own size, so a weight whose gradient is within rounding
    # of zero can move by up to about lr (0.002) either way a step, on one CPU and not on
    # another (8.4e-4 apart on an AVX2-only EPYC): the bound is 2 x 8 x lr. Such weights
    # hardly touch the loss, and there are few of them: a wrong sum moves most weights.
    np.testing.assert_allclose(mirrored["double"], mirrored["single"], rtol=1e-3)
    assert mirrored["max_weight_diff"] < 2 * 8 * 0.002
    assert mirrored["mean_weight_diff"] < 1e-5  # 2e-9 measured; a wrong sum: about lr
    assert len(mirrored["double"]) == 8 and mirrored["double"][-1] < mirrored["double"][0]


@pytest.mark.slow  # trains, starts Ray or exports
def test_steps_looped_in_one_call_are_the_steps_called_one_at_a_time(mirrored):
    # Calls of 3, 3, then 2 steps: the last step's loss of each call, and the same weights.
    assert mirrored["chunked"] == [mirrored["double"][2], mirrored["double"][5], mirrored["double"][7]]
    assert mirrored["chunked_identical"] is True and mirrored["chunked_max_weight_diff"] == 0.0


@pytest.mark.slow  # trains, starts Ray or exports
def test_gradients_summed_in_bf16_stay_identical_and_close_to_fp32(mirrored):
    # Still one identical update on every replica, close to the float32 run but not equal
    # to it (so the bf16 path really ran).
    assert mirrored["bf16_allreduce_identical"] is True
    np.testing.assert_allclose(mirrored["bf16_allreduce"], mirrored["single"], rtol=2e-2)
    # The same Adam bound as above; more would mean a wrong sum, not rounding.
    assert 1e-6 < mirrored["bf16_max_weight_diff"] < 2 * 8 * 0.002
    # ... while the typical weight stays close: 1.7e-4 here; a sum missing a replica's share
    # moves most weights by about lr a step.
    assert mirrored["bf16_mean_weight_diff"] < 1e-3


@pytest.mark.slow  # trains, starts Ray or exports
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_fused_update_is_keras_own_step_with_the_penalty_in_the_loss(optimizer):
    """The step adds the L2 penalty's gradient and runs the optimizer in XLA programs: the
    weights must follow Keras' plain step, penalty in the loss, to float32 round-off."""
    import keras
    import tensorflow as tf

    from mnist_dist.step import build_model_and_optimizer, make_train_step

    config = TrainConfig(model="tf-tutorial", optimizer=optimizer, l2=5e-2)  # a large penalty: its gradient must count
    rng = np.random.default_rng(0)
    batches = [(tf.constant(rng.normal(size=(16, 28, 28, 1)), tf.float32), tf.constant(rng.integers(0, 10, 16)))
               for _ in range(3)]

    def keras_step(model, opt, with_penalty):
        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                logits = model(batch[0], training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(batch[1], logits, from_logits=True))
                if with_penalty:
                    loss += tf.add_n(model.losses)
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss, 0.0
        return step

    runs = {}
    for variant in ("fused", "keras", "keras without the penalty"):
        keras.utils.set_random_seed(3)
        model, opt = build_model_and_optimizer(config, steps_per_epoch=2)  # the rate decays after step 2
        next(layer for layer in model.layers if layer.name.startswith("dropout")).rate = 0.0  # no dropout: every variant sees the same forward pass
        if variant == "fused":
            steps = make_train_step(tf.distribute.get_strategy(), model, opt, global_batch=16, allreduce="none")
            losses = [float(steps((x[None], y[None], tf.ones([1, 16])), 1)[1]) for x, y in batches]  # one-step chunks
        else:
            step = keras_step(model, opt, with_penalty=variant == "keras")
            losses = [float(step(batch)[0]) for batch in batches]
        runs[variant] = losses, [w.numpy() for w in model.trainable_weights], int(opt.iterations.numpy())
    (fused_losses, fused_weights, fused_steps), (keras_losses, keras_weights, keras_steps) = runs["fused"], runs["keras"]
    assert fused_steps == keras_steps == 3
    np.testing.assert_allclose(fused_losses, keras_losses, rtol=1e-5)
    # The two graphs compute the same gradients up to float32 rounding, in different orders.
    for a, b in zip(fused_weights, keras_weights):
        if optimizer == "sgd":  # linear in the gradient: rounding stays rounding
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        else:  # Adam: a gradient within rounding of zero can move its weight ~lr either way a step
            assert np.abs(a - b).max() <= 2 * 3 * config.learning_rate

    def mean_diff(a, b):
        return np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)]).mean()
    assert mean_diff(fused_weights, keras_weights) < 1e-6  # Adam 1.4e-9, SGD 6e-13 on the AVX2 kernels
    # The penalty's gradient really counted: without it the dense kernel ends elsewhere.
    dense_kernel = [w.shape for w in fused_weights].index((3136, 512))
    without = runs["keras without the penalty"][1][dense_kernel]
    assert mean_diff([fused_weights[dense_kernel]], [without]) > 100 * mean_diff([fused_weights[dense_kernel]], [keras_weights[dense_kernel]])


def test_calls_run_at_most_steps_per_execution_steps_and_end_at_every_progress_line():
    from mnist_dist.step import steps_per_call

    assert steps_per_call(0, 25, eval_every=100, per_call=10) == [10, 10, 5]  # the epoch's end
    assert steps_per_call(25, 50, eval_every=10, per_call=4) == [4, 1, 4, 4, 2, 4, 4, 2]  # lines at 30, 40
    assert steps_per_call(0, 7, eval_every=100, per_call=1) == [1] * 7
    assert steps_per_call(214, 428, eval_every=100, per_call=10)[:3] == [10, 10, 10]
    assert sum(steps_per_call(214, 428, eval_every=100, per_call=10)) == 214


def test_dense_gradients_are_gathered_only_where_that_sends_at_most_half_the_numbers():
    from mnist_dist.gradients import gathers_inputs

    # tf-tutorial's 3136 x 512 kernel at 2 workers x 128: 0.93M numbers gathered against 1.6M summed.
    assert gathers_inputs((3136, 512), local_batch=128, replicas=2)
    assert not gathers_inputs((3136, 512), local_batch=128, replicas=1)  # nothing to exchange
    assert not gathers_inputs((3136, 512), local_batch=512, replicas=2)  # big batches: all-reduce
    assert not gathers_inputs((400, 120), local_batch=128, replicas=2)  # LeNet-5's first dense layer
    assert gathers_inputs((400, 120), local_batch=32, replicas=2)  # ... which the mirrored check gathers


def test_the_zoo_builds_the_big_dense_layer_linear_so_its_gradient_can_be_gathered():
    from mnist_dist.gradients import GradientExchange, gathered_dense_layers
    from mnist_dist.models import build

    model = build("tf-tutorial")
    (dense,) = gathered_dense_layers(model, local_batch=128, replicas=2)
    assert tuple(dense.kernel.shape) == (3136, 512)
    # Its activation is the next layer, so its output is the pre-activation the exchange reads.
    assert type(model.layers[model.layers.index(dense) + 1]).__name__ == "ReLU"
    exchange = GradientExchange(model, local_batch=128, replicas=2, allreduce="fp32")
    logits, taps = exchange.forward(np.zeros((4, 28, 28, 1), np.float32), training=False)
    ((x, z),) = taps
    assert tuple(logits.shape) == (4, 10) and tuple(x.shape) == (4, 3136) and tuple(z.shape) == (4, 512)
    import keras

    # Nothing patched on the layer: its class's own `call`, and Keras' linear activation.
    assert "call" not in vars(dense) and dense.activation is keras.activations.linear


@pytest.mark.slow  # trains, starts Ray or exports
def test_a_few_hundred_steps_on_real_mnist_beat_chance(mnist_dir, tmp_path, capsys):
    config = TrainConfig(model="lenet5", epochs=1, batch_size=64, workers=1, optimizer="sgd", learning_rate=0.05, val_size=2000,
                         train_limit=19200, eval_every=100, data_dir=str(mnist_dir))
    session = DirectorySession(Location.of(tmp_path))
    final = train(config, session)
    assert final["global_step"] == 300
    assert final["val_accuracy"] > 0.90  # chance is 0.10
    out = capsys.readouterr().out
    for field in ("minibatch loss", "lr ", "minibatch error", "validation error", "ms/step", "img/s"):
        assert field in out
    assert "epoch 1/1: validation accuracy" in out
    assert (tmp_path / "checkpoint_epoch001" / "state.json").is_file()


@pytest.mark.slow  # trains, starts Ray or exports
def test_resume_continues_step_epoch_and_learning_rate(tmp_path):
    config = TrainConfig(model="lenet5", epochs=1, batch_size=50, workers=1, synthetic=True, train_limit=1000,
                         val_size=200, eval_every=1000)
    session = DirectorySession(Location.of(tmp_path))
    first = train(config, session, log=lambda _: None)
    second = train(config.replace(epochs=3), session, log=lambda _: None)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert [h["global_step"] for h in second["history"]] == [20, 40, 60]
    assert second["history"][0] == first["history"][0]
    lrs = [h["learning_rate"] for h in second["history"]]
    assert lrs == pytest.approx([config.learning_rate * config.lr_decay ** e for e in (1, 2, 3)], rel=1e-5)


class StopsAfterStep(DirectorySession):
    """A process that dies right after its step checkpoint at `stop_step` (as a hard kill would)."""

    class Died(Exception):
        pass

    def __init__(self, run, stop_step):
        super().__init__(run)
        self.stop_step = stop_step

    def report(self, metrics, checkpoint_dir, name):
        super().report(metrics, checkpoint_dir, name)
        if metrics["global_step"] == self.stop_step:
            raise self.Died(name)


@pytest.mark.slow  # trains, starts Ray or exports
def test_a_run_resumed_from_a_step_checkpoint_mid_epoch_ends_as_the_uninterrupted_run(tmp_path):
    import keras

    config = TrainConfig(model="lenet5", epochs=2, batch_size=50, workers=1, synthetic=True, train_limit=1000,
                         val_size=200, eval_every=1000, optimizer="sgd", learning_rate=0.05, checkpoint_every="7",
                         augment=True, steps_per_execution=4)
    whole = train(config, DirectorySession(Location.of(tmp_path / "whole")), log=lambda _: None)
    cut = Location.of(tmp_path / "cut")
    with pytest.raises(StopsAfterStep.Died, match="checkpoint_step00000028"):  # in epoch 2 (20 steps an epoch)
        train(config, StopsAfterStep(cut, 28), log=lambda _: None)
    names = sorted(name for name, _ in cut.entries() if name.startswith("checkpoint_"))
    assert names == ["checkpoint_epoch001", "checkpoint_step00000028"]  # only the newest step checkpoint is kept
    lines = []
    resumed = train(config, DirectorySession(cut), log=lines.append)
    assert "resumed from checkpoint_step00000028: global step 28, epoch 1 + 8 steps" in lines
    assert [h["global_step"] for h in resumed["history"]] == [20, 40]
    for key in ("val_accuracy", "val_loss", "train_loss", "learning_rate", "global_step"):
        assert resumed["history"][0][key] == whole["history"][0][key]
    assert set(resumed["history"][0]) == set(whole["history"][0])  # and the timings, which differ
    # The epoch in progress was neither repeated nor skipped: its mean loss and final weights match.
    assert resumed["history"][1]["train_loss"] == pytest.approx(whole["history"][1]["train_loss"], rel=1e-5)
    weights = [keras.models.load_model(tmp_path / r / "checkpoint_epoch002" / "model.keras").get_weights() for r in ("whole", "cut")]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not any(name.startswith("checkpoint_step") for name, _ in cut.entries())  # dropped by the epoch's checkpoint
    progress = (cut / "progress.json").read_json()
    assert [r["reason"] for r in progress["resizes"]] == ["start", "start"] and progress["lost_steps"] == 0


def test_the_time_line_counts_only_the_epochs_this_command_trained():
    import time

    from mnist_dist.results import time_line

    now = time.time()
    history = [{"epoch": 1, "epoch_train_seconds": 9.0, "finished_at": now - 100},
               {"epoch": 2, "epoch_train_seconds": 8.0, "finished_at": now - 5}]
    line = time_line(history, wall_seconds=20.0)
    assert "20.0 s wall, of which 8.0 s training and 12.0 s start-up" in line
    assert "(epoch 1 was trained before this command resumed the run)" in line
    # A finished run named again trains nothing: no negative start-up time.
    assert "of which 0.0 s training and 3.0 s" in time_line(history, wall_seconds=3.0)
    assert "before" not in time_line(history, wall_seconds=200.0)


@pytest.mark.slow  # trains, starts Ray or exports
def test_half_written_checkpoint_is_never_taken(tmp_path):
    from mnist_dist import checkpoint as ckpt

    config = TrainConfig(model="lenet5", epochs=2, batch_size=50, workers=1, synthetic=True, train_limit=500,
                         val_size=100, eval_every=1000)
    train(config, DirectorySession(Location.of(tmp_path)), log=lambda _: None)
    # Epoch 2 "crashed" mid-write: its model is cut short.
    broken = tmp_path / "checkpoint_epoch002" / ckpt.MODEL_FILE
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_state(tmp_path / "checkpoint_epoch002")
    with DirectorySession(Location.of(tmp_path)).latest_checkpoint() as latest:
        assert latest.name == "checkpoint_epoch001"


def test_best_epoch_is_the_earliest_of_a_tie_and_the_driver_agrees():
    from mnist_dist.launcher import pick_best
    from mnist_dist.loop import score_best
    from mnist_dist.results import best_epoch

    history = [{"epoch": 1, "val_accuracy": 0.90}, {"epoch": 2, "val_accuracy": 0.95}, {"epoch": 3, "val_accuracy": 0.95}]
    assert best_epoch(history) == 2
    kept = [("c3", history[2]), ("c2", history[1]), ("c1", history[0])]  # Ray's top-k, any order
    assert pick_best(kept)[0] == "c2"  # the same rule, whatever order Ray keeps them in
    assert pick_best(kept[:1] + kept[2:])[0] == "c3"  # the earliest of the tie was not kept
    # Best weights from before a resume are not in memory: the driver scores the checkpoint.
    assert score_best(None, history, None, None, None) is None
    assert score_best(None, history, (3, []), None, None) is None


def test_presets_build_the_optimizer_they_name():
    import keras

    from mnist_dist.config import preset
    from mnist_dist.optimizers import make_optimizer

    tutorial = preset("tutorial")
    # The TF tutorial: SGD + momentum 0.9, 0.01 at batch 64 (0.02 at the global 2 x 64), x0.95 per epoch.
    assert (tutorial.global_batch_size, tutorial.learning_rate, tutorial.lr_decay) == (128, 0.02, 0.95)
    sgd = make_optimizer(tutorial, tutorial.learning_rate)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    default = preset("default")
    assert default.global_batch_size == 256
    assert isinstance(make_optimizer(default, default.learning_rate), keras.optimizers.Adam)
    assert preset("smoke").optimizer == "sgd"  # its lr 0.05 is an SGD rate


def test_the_distillation_loss_is_the_labels_and_the_softened_teacher_weighted():
    from mnist_dist.step import distillation_loss

    labels, student, teacher = np.array([0, 1]), np.array([[2.0, 0.0], [0.5, 1.5]]), np.array([[1.0, 3.0], [0.0, 2.0]])
    d, t = 0.7, 3.0

    def log_softmax(z):
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    hard = -log_softmax(student)[[0, 1], labels]
    q = np.exp(log_softmax(teacher / t))
    kl = (q * (log_softmax(teacher / t) - log_softmax(student / t))).sum(-1)
    got = distillation_loss(labels, student.astype(np.float32), teacher.astype(np.float32), d, t).numpy()
    np.testing.assert_allclose(got, (1 - d) * hard + d * t**2 * kl, rtol=1e-5)


@pytest.mark.parametrize("distill", [1.0, 0.5])
def test_the_step_learns_the_teachers_logits(distill):
    """A teacher with the student's own weights: at --distill 1 there is nothing to learn, and
    at 0.5 the loss is half the labels' cross-entropy; another teacher moves the weights."""
    import keras
    import tensorflow as tf

    from mnist_dist.step import build_model_and_optimizer, make_train_step

    config = TrainConfig(model="lenet5", optimizer="sgd", learning_rate=0.1, l2=0.0)  # no dropout nor batch norm
    rng = np.random.default_rng(0)
    chunk = (tf.constant(rng.normal(size=(1, 16, 28, 28, 1)), tf.float32), tf.constant(rng.integers(0, 10, (1, 16))),
             tf.ones([1, 16]))
    keras.utils.set_random_seed(1)
    model, opt = build_model_and_optimizer(config, steps_per_epoch=10)
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    other = keras.models.clone_model(model)  # freshly initialised
    before = model.get_weights()
    cross_entropy = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        chunk[1][0], model(chunk[0][0]), from_logits=True)))

    _total, loss, _error = make_train_step(tf.distribute.get_strategy(), model, opt, global_batch=16, allreduce="none",
                                           teacher=twin, distill=distill, temperature=3.0)(chunk, 1)
    moved = max(np.abs(a - b).max() for a, b in zip(model.get_weights(), before))
    assert float(loss) == pytest.approx((1 - distill) * cross_entropy, rel=1e-5, abs=1e-6)
    assert (moved < 1e-7) == (distill == 1.0), moved  # rounding of two equal softmaxes, or a real step
    if distill == 1.0:
        make_train_step(tf.distribute.get_strategy(), model, opt, global_batch=16, allreduce="none",
                        teacher=other, distill=distill, temperature=3.0)(chunk, 1)
        assert max(np.abs(a - b).max() for a, b in zip(model.get_weights(), before)) > 1e-4
