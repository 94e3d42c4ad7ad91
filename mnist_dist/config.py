"""The one typed configuration object for a training run.

Everything a run needs lives in `TrainConfig`; it is saved with every run and every
checkpoint, so a run can be resumed or exported without the command line that made it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mnist_dist.errors import MnistDistError

MODELS = ("tf-tutorial", "lenet5", "cnn-bn", "cnn-deep", "edge")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16")
ALLREDUCE_DTYPES = ("auto", "fp32", "bf16")


class ConfigError(MnistDistError, ValueError):
    """A configuration value a run cannot use; the message names the fix."""


@dataclass
class TrainConfig:
    # What is trained.
    model: str = "tf-tutorial"
    epochs: int = 10
    # The default schedule is tuned for time to accuracy (`bench tta`): Adam at global batch
    # 256 reaches its accuracy target in half the epochs the tutorial's SGD recipe (the
    # `tutorial` preset) needs (docs/benchmarks.md#time-to-accuracy-bench-tta).
    # Per worker of the full group: the global batch is batch_size * workers (the range's MAX),
    # and stays that whatever number of workers trains it (docs/spot.md).
    batch_size: int = 128
    optimizer: str = "adam"
    learning_rate: float = 0.002
    lr_decay: float = 0.6  # once per epoch, staircase, counted in global steps
    momentum: float = 0.9  # SGD only
    # In the tutorial's units: l2 * tf.nn.l2_loss(w) on dense weights and biases.
    l2: float = 5e-4
    augment: bool = False  # random +-2 px shifts of training images
    rotate: float = 0.0  # with augment: also rotate by up to this many degrees
    zoom: float = 0.0  # with augment: also scale by 1 +- zoom
    precision: str = "fp32"
    # The dtype the workers' gradients (and a big dense layer's gathered inputs and output
    # gradients) travel and are summed in: bf16 halves the bytes; "auto" follows `precision`.
    allreduce: str = "auto"
    seed: int = 0
    eval_every: int = 100  # steps between progress lines
    # Train steps per tf.function call (Keras' steps_per_execution): one in-graph loop spares
    # each step the Python call and its dispatch. A call always ends at a progress line and an epoch end.
    steps_per_execution: int = 10
    # Benchmarks only (`bench tta`): also score the test set at each eval interval. The
    # scores are recorded, never used to choose anything.
    probe_test: bool = False
    # Knowledge distillation: a finished run (its best checkpoint) whose logits the model also
    # learns, with weight `distill` on temperature**2 x KL at `temperature`, 1 - distill on the
    # labels; the defaults are the edge model's (docs/benchmarks.md).
    teacher: str | None = None
    distill: float = 0.9
    temperature: float = 4.0

    # What it is trained on.
    data_dir: str | None = None
    synthetic: bool = False
    val_size: int = 5000
    train_limit: int | None = None  # use only the first N training images (smoke tests)

    # Where and how it runs.
    workers: int = 2  # a fixed group, or the MAX of an elastic range
    min_workers: int | None = None  # an elastic range MIN-MAX (--workers 1-4): Ray starts with MIN and grows to MAX
    # Seconds between Ray's checks whether an elastic group can grow (ScalingConfig.elastic_resize_monitor_interval_s).
    resize_interval: float = 15.0
    # A step checkpoint every N steps ("500") or seconds ("60s"); "0" for epoch checkpoints only.
    checkpoint_every: str = "60s"
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0  # below 1: workers share a GPU (Ray's fractional GPUs)
    # CPU workers that fill their node's CPUs each keep to their own (process_setup.cores_to_pin).
    pin_cpus: bool = True
    address: str | None = None  # None: embedded local Ray
    dashboard: bool = False  # the embedded local Ray's dashboard (http://127.0.0.1:8265)
    expose_ray: bool = False  # the embedded local Ray listens on every interface, not only 127.0.0.1
    storage: str = "runs"
    name: str | None = None
    max_failures: int = 0
    keep_checkpoints: int = 3

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.workers

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers

    @property
    def worker_range(self) -> str:
        """`--workers` as given: "2", or "1-4" for an elastic range."""
        return f"{self.min_workers}-{self.workers}" if self.elastic else str(self.workers)

    @property
    def checkpoint_interval(self) -> tuple[int, float]:
        """(steps, seconds) between step checkpoints; 0 where that kind is off."""
        text = str(self.checkpoint_every).strip()
        number = text[:-1] if text.endswith("s") else text
        try:
            value = float(number) if text.endswith("s") else int(number)
        except ValueError:
            raise ConfigError(f"--checkpoint-every {text!r} must be a number of steps (500) or seconds (60s), "
                              "or 0 for epoch checkpoints only") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"--checkpoint-every {text!r} must be >= 0 (0: epoch checkpoints only)")
        return (0, float(value)) if text.endswith("s") else (int(value), 0.0)

    @property
    def allreduce_dtype(self) -> str:
        """fp32 or bf16: `allreduce` with "auto" resolved (bf16 for bf16 training on CPU workers)."""
        if self.allreduce != "auto":
            return self.allreduce
        return "bf16" if self.precision == "bf16" and not self.gpus_per_worker else "fp32"

    def validate(self) -> TrainConfig:
        numbers = {"--lr": self.learning_rate, "--lr-decay": self.lr_decay, "--l2": self.l2, "--rotate": self.rotate,
                   "--zoom": self.zoom, "momentum": self.momentum, "--distill": self.distill, "--temperature": self.temperature}
        for flag, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}")
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose {' or '.join(PRECISIONS)}"),
            (self.allreduce in ALLREDUCE_DTYPES, f"unknown --exchange-dtype {self.allreduce!r}; choose one of {', '.join(ALLREDUCE_DTYPES)}"),
            (not (self.allreduce == "bf16" and self.gpus_per_worker),
             "--exchange-dtype bf16 is for CPU workers' ring all-reduce; GPU workers sum in fp32 over NCCL. Fix: drop --exchange-dtype or pass --exchange-dtype fp32"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.min_workers is None or 1 <= self.min_workers <= self.workers,
             f"--workers {self.min_workers}-{self.workers}: the range must be MIN-MAX with 1 <= MIN <= MAX, e.g. 1-4"),
            (math.isfinite(self.resize_interval) and self.resize_interval > 0,
             f"--resize-interval must be > 0 seconds, got {self.resize_interval}"),
            (self.cpus_per_worker >= 1, f"--cpus-per-worker must be >= 1, got {self.cpus_per_worker}"),
            (self.gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}"),
            (self.gpus_per_worker < 1 or float(self.gpus_per_worker).is_integer(),
             f"--gpus-per-worker must be a fraction below 1 (workers share a GPU) or a whole number, got {self.gpus_per_worker}"),
            (self.learning_rate > 0, f"--lr must be > 0, got {self.learning_rate}"),
            (0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {self.lr_decay}"),
            (self.val_size >= 1, f"--val-size must be >= 1, got {self.val_size}"),
            (0 <= self.rotate <= 45, f"--rotate must be in [0, 45] degrees, got {self.rotate}"),
            (0 <= self.zoom < 0.5, f"--zoom must be in [0, 0.5), got {self.zoom}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (self.steps_per_execution >= 1, f"--steps-per-execution must be >= 1, got {self.steps_per_execution}"),
            (self.keep_checkpoints >= 1, f"--keep must be >= 1, got {self.keep_checkpoints}"),
            (self.max_failures >= -1, f"--max-failures must be >= -1 (-1: unlimited), got {self.max_failures}"),
            (self.l2 >= 0, f"--l2 must be >= 0, got {self.l2}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (0 < self.distill <= 1, f"--distill must be in (0, 1], the weight of the teacher's logits against the labels', got {self.distill}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.teacher != "", "--teacher must not be empty. Fix: the --storage/--name folder of a finished run, or leave it out"),
            (self.train_limit is None or self.train_limit >= self.global_batch_size,
             f"--train-limit {self.train_limit} is fewer images than one global batch "
             f"({self.workers} worker(s) x --batch-size {self.batch_size} = {self.global_batch_size}); "
             "pass at least that many, or leave it out to train on every image"),
            (self.name is None or (self.name not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name),
             f"--name {self.name!r} must be one folder name inside --storage (no '/', not '.' or '..')"),
            (bool(self.storage), "--storage must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.checkpoint_interval  # noqa: B018  (raises its own one-line error)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From this version's own `to_dict` (the driver to its workers): every key must be known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> TrainConfig:
        """From a config saved with a run or checkpoint, maybe by another version: keys this
        version does not have are dropped. The one loader of saved configs."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Named starting points; command-line options override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The TensorFlow tutorial CNN, 10 epochs, Adam 2e-3 decaying x0.6 per epoch; global batch 2 x 128.
    "default": {},
    # The tutorial's own recipe: SGD + momentum 0.9, x0.95 per epoch, global batch 2 x 64, and
    # its 0.01 at batch 64 scaled linearly to 0.02 at 128.
    "tutorial": {"batch_size": 64, "optimizer": "sgd", "learning_rate": 0.02, "lr_decay": 0.95},
    # cnn-deep, Adam, shifts + rotations + zoom, 30 epochs: the most accurate recipe found, ahead
    # of cnn-bn with shifts (docs/benchmarks.md#accuracy-and-wall-time-of-full-runs).
    "best": {"model": "cnn-deep", "epochs": 30, "optimizer": "adam", "learning_rate": 0.001, "lr_decay": 0.92,
             "augment": True, "rotate": 10.0, "zoom": 0.1},
    # The edge model (models.edge): 40 epochs of mildly rotated and zoomed images, global
    # batch 2 x 64; its int8 export is under 40 KB. With --teacher (a `best` run), distilled (export/README.md).
    "edge": {"model": "edge", "epochs": 40, "batch_size": 64, "optimizer": "adam", "learning_rate": 0.003,
             "lr_decay": 0.93, "l2": 0.0, "augment": True, "rotate": 8.0, "zoom": 0.05},
    # Seconds, not minutes: for smoke tests and trying the plumbing.
    "smoke": {"model": "lenet5", "epochs": 2, "optimizer": "sgd", "batch_size": 64, "learning_rate": 0.05, "train_limit": 2048, "val_size": 512, "eval_every": 10},
}


def parse_workers(text: str | int) -> tuple[int | None, int]:
    """`--workers` / MNIST_WORKERS: "2" is a fixed group, "1-4" an elastic range: (MIN or None, MAX)."""
    low, dash, high = str(text).strip().partition("-")
    try:
        values = (int(low), int(high)) if dash else (None, int(low))
    except ValueError:
        raise ConfigError(f"--workers {text!r} must be a number (2) or a range MIN-MAX (1-4)") from None
    return values


def preset(preset_name: str, **overrides: Any) -> TrainConfig:
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset_name], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values).validate()
