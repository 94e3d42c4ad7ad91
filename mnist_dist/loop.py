"""The training loop, for any tf.distribute strategy: build, resume, run each epoch, end it,
save it. The step itself is in mnist_dist.step; checkpoints and reports go through a
`Session` (mnist_dist.sessions), so the same loop runs in one process and on N Ray workers.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnist_dist import checkpoint as ckpt
from mnist_dist import gradients, machine, ownership, spot, step
from mnist_dist.config import TrainConfig
from mnist_dist.data import Mnist, load_for
from mnist_dist.errors import MnistDistError
from mnist_dist.progress import Clock
from mnist_dist.results import best_epoch
from mnist_dist.scoring import make_evaluator, make_worker_sum
from mnist_dist.sessions import Session, epoch_checkpoint_name, step_checkpoint_name
from mnist_dist.summaries import SUBDIR, Summaries
from mnist_dist.tfdata import distributed_chunks, replica_slices


class TrainingDiverged(MnistDistError):
    """The loss stopped being a number; the run stops before it saves another checkpoint."""


def check_finite(loss: float, step: int, config: TrainConfig, last_epoch: int) -> None:
    if math.isfinite(loss):
        return
    kept = (f"the last good checkpoint, checkpoint_epoch{last_epoch:03d}, is kept (mnist-dist export --checkpoint RUN/"
            f"checkpoint_epoch{last_epoch:03d})") if last_epoch else "no epoch finished, so no checkpoint was saved"
    raise TrainingDiverged(f"training diverged: the loss is {loss} at step {step} with --lr {config.learning_rate:g}; {kept}. "
                           "Fix: a lower --lr, under a new --name.")


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


class Trainer:
    """One run of the loop on this worker. `run()` trains to `config.epochs` and returns the
    last metrics with the history.

    One input iterator serves every remaining epoch, and the run reads it to its last batch:
    under MultiWorkerMirroredStrategy, tearing down a tf.data iterator that still had batches
    to give blocked a worker for tens of seconds (docs/design.md).
    """

    def __init__(self, config: TrainConfig, session: Session, strategy=None, data: Mnist | None = None,
                 log: Callable[[str], None] = print, clock: Clock | None = None):
        import tensorflow as tf

        self.config, self.session = config, session
        self.strategy = strategy or tf.distribute.get_strategy()
        self.is_chief = session.rank == 0
        self.say = log if self.is_chief else (lambda _msg: None)
        self.clock = clock or Clock()
        if data is None:
            self.say(self.clock.line("loading MNIST ..." if not config.synthetic else "making synthetic images ..."))
        self.data = data or load_for(config)
        # The configuration's, whatever the number of workers: an elastic group of N splits it N ways.
        self.global_batch = config.global_batch_size
        self.steps_per_epoch = len(self.data.train_y) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.data.train_y)} training images are fewer than one global batch of {self.global_batch}")
        # One replica has nothing to sum; rounding its gradients would only lose precision.
        self.allreduce = config.allreduce_dtype if self.strategy.num_replicas_in_sync > 1 else "none"
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.skip_steps, self.train_seconds = 0, 0, 0.0
        self.partial: dict[str, float] = {}  # a resumed epoch's loss and seconds before its step checkpoint
        self.progress = spot.Progress(session.run, session.command_id, session.world_size) if self.is_chief else None
        self.best_weights: tuple[int, list] | None = None  # (epoch, weights) of the best epoch trained here
        self.next_chunk = None

    # -- build and resume ------------------------------------------------------------
    def build(self) -> None:
        import keras

        # --seed fixes the initial weights too (worker 0's, which the strategy copies to every
        # replica) and the dropout masks: two runs of one configuration train alike.
        keras.utils.set_random_seed(self.config.seed)
        with self.strategy.scope():
            self.model, self.optimizer = step.build_model_and_optimizer(self.config, self.steps_per_epoch)
            self.teacher = self.load_teacher()

    def load_teacher(self):
        """The --teacher checkpoint (settled by the driver), frozen, with its variables mirrored like the model's."""
        if self.config.teacher is None:
            return None
        from mnist_dist.store import Location

        teacher, state = ckpt.load_model_at(Location.of(self.config.teacher))
        teacher.trainable = False
        self.say(f"teacher: {state['config']['model']} of {self.config.teacher} (epoch {state['epoch']}, validation accuracy "
                 f"{100 * state['val_accuracy']:.2f}%); --distill {self.config.distill:g} at --temperature {self.config.temperature:g}")
        if state["config"].get("precision") == "bf16" and machine.slow_bf16_warning():
            self.say("warning: the teacher was trained with --precision bf16 and computes in it, but this CPU has neither "
                     "AVX-512-BF16 nor AMX, so each of its forward passes is emulated, several times slower. Fix: a teacher "
                     "trained in fp32, or workers on CPUs with AMX or AVX-512-BF16")
        return teacher

    def resume(self) -> None:
        """Weights, optimizer slots, history and the place in the epoch from the session's latest
        checkpoint (an epoch's or a step's), if any."""
        restored = None
        with self.session.latest_checkpoint() as restore_dir:
            if restore_dir is not None:
                state = ckpt.restore_into(self.model, restore_dir)
                self.history, self.train_seconds = state.get("history", []), state.get("train_seconds", 0.0)
                self.partial = state.get("partial") or {}
                # By what it holds: a bucket's checkpoint arrives in a temporary folder of its own name.
                restored = (step_checkpoint_name(state["global_step"]) if state.get("kind") == "step"
                            else epoch_checkpoint_name(state["epoch"]))
        at = self.global_step()
        self.start_epoch, self.skip_steps = divmod(at, self.steps_per_epoch)
        if len(self.history) != self.start_epoch:
            raise RuntimeError(f"checkpoint step {at} is in epoch {self.start_epoch + 1} of {self.steps_per_epoch} steps, "
                               f"but its history holds {len(self.history)} epochs")
        if restored:
            self.say(f"resumed from {restored}: global step {at}, epoch {self.start_epoch}"
                     + (f" + {self.skip_steps} steps" if self.skip_steps else ""))
        if self.progress:
            entry = self.progress.start(at, restored is not None)
            lost = self.progress.record["lost_steps"]
            if entry["reason"] != "start" or restored:
                self.say(f"worker group of {self.session.world_size} ({entry['reason']}) from global step {at}; "
                         f"steps trained twice so far: {lost}")

    def has_batch_norm(self) -> bool:
        import keras

        return any(isinstance(layer, keras.layers.BatchNormalization) for layer in self.model.layers)

    def global_step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def prepare(self) -> None:
        """The step, the scorers and the input of every remaining epoch; the run's first lines."""
        config, strategy, session = self.config, self.strategy, self.session
        if self.start_epoch == 0:
            self.say(self.data.describe())
            split = (f"{session.world_size} worker(s) x batch {config.batch_size}" if session.world_size == config.workers
                     else f"{session.world_size} worker(s) of {config.worker_range}, about {self.global_batch // session.world_size} each,")
            self.say(f"model {config.model}: {self.model.count_params():,} parameters; {split} = global batch {self.global_batch}; "
                     f"{self.steps_per_epoch} steps/epoch; "
                     f"precision {config.precision}"
                     + gradients.describe(self.model, replica_slices(self.global_batch, strategy.num_replicas_in_sync)[1],
                                          strategy.num_replicas_in_sync, self.allreduce))
            if self.global_batch % strategy.num_replicas_in_sync and self.has_batch_norm():
                self.say(f"note: {strategy.num_replicas_in_sync} workers do not split the global batch of {self.global_batch} "
                         "evenly; the padding rows take part in batch normalization's batch statistics, so this "
                         f"{config.model} trains slightly otherwise than on a count that divides it (docs/spot.md)")
            if config.precision == "bf16" and not config.gpus_per_worker and (warning := machine.slow_bf16_warning()):
                self.say(warning)
        self.train_step = step.make_train_step(strategy, self.model, self.optimizer, self.global_batch, self.allreduce,
                                               self.teacher, config.distill, config.temperature)
        self.worker_sum = make_worker_sum(strategy, session.world_size)
        self.evaluate = make_evaluator(self.model, strategy, session.rank, session.world_size)
        self.sync_statistics = step.make_statistics_sync(strategy, self.model)
        self.summaries = Summaries(session.run / SUBDIR if self.is_chief else None)
        if self.start_epoch == 0:
            self.summaries.graph(self.model)
        self.next_chunk = distributed_chunks(strategy, self.data, config, self.start_epoch, self.global_batch,
                                             config.epochs - self.start_epoch, self.skip_steps)
        self.watch = spot.Watch(config, session, self.global_step())
        self.step_floor = spot.step_floor()
        self.say(self.clock.line("tracing and compiling the train step: the first call takes longest ..."))

    # -- an epoch --------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> tuple[float, list[float], list[dict]]:
        """Trains one epoch, or what is left of it: (training seconds, each call's summed loss, test probes)."""
        config, data = self.config, self.data
        resumed = epoch == self.start_epoch and self.skip_steps
        carried = self.partial if resumed else {}
        # Rank 0 carries the epoch's loss summed over the workers before its step checkpoint.
        losses = [carried.get("loss_sum", 0.0)] if self.is_chief and resumed else []
        epoch_start = interval_start = time.perf_counter() - carried.get("seconds", 0.0)
        paused = 0.0  # evaluation, step checkpoints and waits: not training time
        probes = list(carried.get("probes", []))
        at = epoch * self.steps_per_epoch + (self.skip_steps if resumed else 0)
        interval_steps, end = 0, (epoch + 1) * self.steps_per_epoch
        # Exactly steps_per_epoch batches per epoch, the same on every worker, so the loop
        # never needs the distributed iterator's cross-worker end-of-data check.
        for steps in step.steps_per_call(at, end, config.eval_every, config.steps_per_execution, self.watch.boundaries()):
            call_start = time.perf_counter()
            total, loss, error = self.train_step(self.next_chunk(steps), steps)
            if self.step_floor:
                time.sleep(max(0.0, call_start + steps * self.step_floor - time.perf_counter()))
            losses.append(total)
            interval_steps += steps
            at += steps  # counted here: reading optimizer.iterations back would wait on the device
            if at % config.eval_every == 0:  # every worker: they score a slice each
                elapsed = time.perf_counter() - interval_start
                eval_start = time.perf_counter()
                loss, error = self.worker_sum(np.array([float(loss), float(error)], np.float32))
                check_finite(float(loss), at, config, epoch)
                _, val_acc = self.evaluate(data.val_x, data.val_y)
                if config.probe_test:
                    probes.append({"step": at, "train_seconds": self.train_seconds + eval_start - epoch_start - paused,
                                   "test_accuracy": self.evaluate(data.test_x, data.test_y)[1]})
                paused += time.perf_counter() - eval_start
                self.progress_line(at, float(loss), float(error), val_acc, interval_steps, elapsed)
                interval_steps, interval_start = 0, time.perf_counter()
            if at < end:  # an epoch's end has its own checkpoint
                pause_start = time.perf_counter()
                if self.between_calls(at, losses, pause_start - epoch_start - paused, probes):
                    interval_steps, interval_start = 0, time.perf_counter()
                # The checks themselves are part of training; a checkpoint or a wait is not.
                paused += time.perf_counter() - pause_start - self.watch.last_check
            if self.progress:
                self.progress.step(at)
        return time.perf_counter() - epoch_start - paused, losses, probes

    def between_calls(self, at: int, losses: list, epoch_seconds: float, probes: list) -> bool:
        """What the workers agreed to do at this call boundary (spot.Watch); True after a checkpoint."""
        decision = self.watch.at_boundary(at)
        if not decision.checkpoint:
            return False
        self.save_step(at, losses, epoch_seconds, decision.stop, probes)
        if decision.stop == "notice":
            left = self.watch.notice - time.time()
            self.say(f"a node of this group is being reclaimed in {left:.0f} s: step checkpoint at global step {at} taken; "
                     "training on until just before the deadline")
        elif decision.stop:
            why = "a node of this group is being reclaimed" if decision.stop == "preemption" else "the cluster has room for more workers"
            self.say(f"{why}: step checkpoint at global step {at} taken; waiting for Ray to restart the worker group")
            while time.time() < decision.deadline:
                time.sleep(0.5)
            self.say(f"no restart came by the deadline; training on from global step {at}")
            self.watch.resumed_without_restart(decision)
            if self.progress:
                self.progress.step(at, force=True)
        return True

    def save_step(self, at: int, losses: list, epoch_seconds: float, stop: str | None, probes: list) -> None:
        """A checkpoint in the middle of an epoch: weights, optimizer, global step, and the epoch's
        loss, seconds and test probes so far; the data order follows from the step (tfdata.train_dataset)."""
        loss_sum = float(self.worker_sum(np.array([sum(float(x) for x in losses)], np.float32))[0])
        self.sync_statistics()  # batch-norm moving statistics: every replica's copy alike, as at an epoch end
        state = {"epoch": len(self.history), "global_step": at, "kind": "step", "history": self.history,
                 "train_seconds": self.train_seconds, "partial": {"loss_sum": loss_sum, "seconds": epoch_seconds, "probes": probes},
                 "stopped_for": None if stop == "notice" else stop}
        # -1, below any accuracy: Ray's CheckpointConfig ranks a step checkpoint below every epoch's.
        # (Not NaN: Ray's checkpoint snapshot stores it as null, and a resumed run cannot rank null.)
        metrics = {"kind": "step", "epoch": len(self.history), "global_step": at, "val_accuracy": -1.0}
        started = time.monotonic()
        self.write_checkpoint(state, metrics, step_checkpoint_name(at))
        seconds = time.monotonic() - started
        self.watch.checkpointed(at, seconds)
        stopping = None if stop == "notice" else stop
        if self.progress:
            self.progress.step(at, stopping=stopping, force=True)
        if not stop:
            self.say(f"step checkpoint at global step {at} ({seconds:.2f} s)")

    def progress_line(self, at: int, loss: float, error: float, val_acc: float, steps: int, elapsed: float) -> None:
        lr = step.current_lr(self.optimizer)
        images_per_second = steps * self.global_batch / elapsed
        self.summaries.scalars(at, {"train/loss": loss, "train/learning_rate": lr, "train/minibatch_error": error,
                                    "val/error": 1 - val_acc, "val/accuracy": val_acc,
                                    "train/images_per_second": images_per_second})
        self.say(f"step {at:6d} (epoch {at / self.steps_per_epoch:5.2f}) | minibatch loss {loss:.4f} | "
                 f"lr {lr:.6f} | minibatch error {100 * error:5.2f}% | validation error {100 * (1 - val_acc):5.2f}% | "
                 f"{1000 * elapsed / steps:6.1f} ms/step | {images_per_second:7.0f} img/s")

    def end_epoch(self, epoch: int, epoch_seconds: float, losses: list, probes: list) -> dict[str, Any]:
        """Syncs statistics, scores the epoch and keeps its metrics; on the last epoch, the test score."""
        config, data = self.config, self.data
        self.train_seconds += epoch_seconds
        self.sync_statistics()
        val_loss, val_acc = self.evaluate(data.val_x, data.val_y)
        at = self.global_step()
        metrics = {
            "epoch": epoch + 1, "global_step": at, "val_accuracy": val_acc, "val_loss": val_loss,
            "train_loss": float(self.worker_sum(np.array([sum(float(x) for x in losses)], np.float32))[0]) / self.steps_per_epoch,
            "learning_rate": step.current_lr(self.optimizer),
            "epoch_train_seconds": epoch_seconds, "train_seconds": self.train_seconds,
            "images_per_second": self.steps_per_epoch * self.global_batch / epoch_seconds,
            "finished_at": time.time(),  # so that a resumed run's time line counts only its own epochs
            **self.watch.cost(),  # the call-boundary collectives of mnist_dist.spot (docs/benchmarks.md)
        }
        check_finite(metrics["train_loss"] + val_loss, at, config, epoch)
        if config.probe_test:
            metrics["test_probes"] = probes + [{"step": at, "train_seconds": self.train_seconds,
                                                "test_accuracy": self.evaluate(data.test_x, data.test_y)[1]}]
        self.history.append(metrics)
        self.best_weights = keep_if_best(self.model, self.history, self.best_weights)
        if epoch + 1 == config.epochs:
            metrics = {**metrics, "test": score_best(self.model, self.history, self.best_weights, self.evaluate, data)}
        self.summaries.scalars(at, {"val/accuracy": val_acc, "val/error": 1 - val_acc, "epoch/val_accuracy": val_acc,
                                    "epoch/val_loss": val_loss, "epoch/train_loss": metrics["train_loss"],
                                    "epoch/images_per_second": metrics["images_per_second"]})
        self.summaries.sync()
        self.say(f"epoch {epoch + 1}/{config.epochs}: validation accuracy {100 * val_acc:.2f}% (loss {val_loss:.4f}), "
                 f"{epoch_seconds:.1f} s, {metrics['images_per_second']:.0f} img/s")
        return metrics

    def save(self, metrics: dict[str, Any]) -> None:
        """The epoch's checkpoint, through the session."""
        self.write_checkpoint({**metrics, "history": self.history}, metrics, epoch_checkpoint_name(metrics["epoch"]))
        if self.progress:
            self.progress.step(metrics["global_step"], force=True)

    def write_checkpoint(self, state: dict[str, Any], metrics: dict[str, Any], name: str) -> None:
        """A checkpoint through the session; every rank adds its weights' digest."""
        with tempfile.TemporaryDirectory(prefix="mnist-ckpt-") as tmp:
            out = Path(tmp) / "checkpoint"
            out.mkdir()
            ownership.mark(out, "checkpoint")
            # Every rank leaves its own digest: the run can prove the replicas stayed identical.
            rank = self.session.rank
            (out / f"replica-{rank}.json").write_text(json.dumps({"rank": rank, "weights_sha256": step.weights_sha256(self.model)}))
            if self.is_chief:
                ckpt.save(out, self.model, {**state, "config": self.config.to_dict(), "data_source": self.data.source,
                                            "steps_per_epoch": self.steps_per_epoch})
            self.session.report(metrics, out, name)

    # -- the whole run ---------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.build()
        self.resume()
        self.prepare()
        metrics: dict[str, Any] = self.history[-1] if self.history else {}
        for epoch in range(self.start_epoch, self.config.epochs):
            trained = self.run_epoch(epoch)
            ending = time.monotonic()
            metrics = self.end_epoch(epoch, *trained)
            self.save(metrics)
            self.watch.epoch_ended(metrics["global_step"], time.monotonic() - ending)
        self.summaries.close()
        return {**metrics, "history": self.history, "steps_per_epoch": self.steps_per_epoch}


def train(config: TrainConfig, session: Session, strategy=None, data: Mnist | None = None,
          log: Callable[[str], None] = print, clock: Clock | None = None) -> dict[str, Any]:
    """Train to `config.epochs`, resuming from the session's latest checkpoint; returns the last metrics."""
    return Trainer(config, session, strategy, data, log, clock).run()
