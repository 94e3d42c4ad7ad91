"""`mnist-dist tune`: a Ray Tune sweep over TrainConfig fields. Each trial is a real Ray Train
run of its own, reporting validation accuracy per epoch, and ASHA ends the poor ones early
(docs/tune.md).

STORAGE/NAME/ holds `tune.json` (the space and the base config from the start; every trial's
values, status and result, and the best, at the end), each trial's run (`trial-00000`, ...),
and Ray Tune's own experiment state (`tune/`), from which a sweep whose driver was killed
resumes: Tune restarts the unfinished trials, and each trial's run resumes from its own
checkpoints.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from mnist_dist import rundir
from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.errors import RunError
from mnist_dist.store import LOCK_FILE, Location

TUNE_FILE = "tune.json"
TUNE_DIR = "tune"  # Ray Tune's experiment, inside the sweep's folder
METRIC = "val_accuracy"
# The TrainConfig fields a sweep may vary: the recipe, not where or how big the run is.
TUNABLE = ("model", "batch_size", "optimizer", "learning_rate", "lr_decay", "l2", "rotate", "zoom", "augment", "seed",
           "precision", "distill", "temperature")
SAMPLERS = ("uniform", "loguniform")


@dataclass(frozen=True)
class Dimension:
    """One swept field: a list of choices (every one is tried), or a range Tune samples from."""
    field: str
    choices: tuple | None = None
    sampler: str | None = None
    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return ",".join(map(str, self.choices))
        return f"{self.sampler}:{self.low:g}:{self.high:g}"

    def to_tune(self):
        from ray import tune

        if self.choices is not None:
            return tune.grid_search(list(self.choices))
        return getattr(tune, self.sampler)(self.low, self.high)


@dataclass(frozen=True)
class Sweep:
    dimensions: tuple[Dimension, ...]
    samples: int = 1  # Tune's num_samples: each point of the grid this many times (ranges sampled anew)
    grace_epochs: int = 1  # ASHA ends no trial before this many epochs
    max_concurrent: int | None = None  # default: as many trials as the cluster's CPUs hold at once

    @property
    def trials(self) -> int:
        return self.samples * math.prod(len(d.choices) for d in self.dimensions if d.choices is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"space": {d.field: d.describe() for d in self.dimensions}, "samples": self.samples,
                "grace_epochs": self.grace_epochs}


# ------------------------------------------------------------------ the space
def parse_space(entries: list[str], file_text: str | None, names: dict[str, str], kinds: dict[str, type],
                base: TrainConfig) -> tuple[Dimension, ...]:
    """`--space KEY=SPEC` entries and a YAML file's mapping, KEY a train option without its
    dashes (lr, batch-size) and SPEC `a,b,c` (each tried) or `uniform:LO:HI` / `loguniform:LO:HI`.
    Every value is checked as `train` would check it, here, before Ray starts."""
    raw: dict[str, Any] = {}
    if file_text is not None:
        import yaml

        try:
            loaded = yaml.safe_load(file_text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--space-file is not YAML ({str(exc).splitlines()[0]}). Fix: a mapping such as "
                              "'lr: [0.01, 0.05]' or 'lr: {loguniform: [0.001, 0.1]}'") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--space-file must be a YAML mapping of option to values, such as 'lr: [0.01, 0.05]'")
        raw.update(loaded)
    for entry in entries:
        key, sep, spec = entry.partition("=")
        if not sep or not key or not spec:
            raise ConfigError(f"--space {entry!r} is not KEY=VALUES. Fix: --space lr=0.01,0.05 or --space lr=loguniform:0.001:0.1")
        raw[key.strip()] = _spec_from_text(key.strip(), spec.strip())
    if not raw:
        raise ConfigError("tune needs a space to search. Fix: --space lr=0.01,0.05 (repeat for more options), "
                          "or --space-file SPACE.yaml")
    return tuple(_dimension(str(key), spec, names, kinds, base) for key, spec in raw.items())


def _spec_from_text(key: str, spec: str) -> Any:
    sampler, _, bounds = spec.partition(":")
    if sampler in SAMPLERS:
        low, sep, high = bounds.partition(":")
        if not sep:
            raise ConfigError(f"--space {key}={spec}: a range is {sampler}:LOW:HIGH, such as {sampler}:0.001:0.1")
        return {sampler: [low, high]}
    return [value.strip() for value in spec.split(",")]


def _dimension(key: str, spec: Any, names: dict[str, str], kinds: dict[str, type], base: TrainConfig) -> Dimension:
    name = key.lstrip("-")
    field_name = names.get(name, name.replace("-", "_"))
    flags = ", ".join(sorted(flag for flag, f in names.items() if f in TUNABLE))
    if field_name not in TUNABLE:
        raise ConfigError(f"--space {key}: not an option a sweep can vary. Fix: one of {flags}")
    if field_name in ("distill", "temperature") and base.teacher is None:
        raise ConfigError(f"--space {key}: shapes distillation, which needs a teacher. Fix: add --teacher RUN (a finished run)")
    kind = kinds[field_name]

    def value(text: Any) -> Any:
        try:
            if kind is bool:
                if isinstance(text, bool):
                    return text
                if str(text).lower() not in ("true", "false"):
                    raise ValueError
                return str(text).lower() == "true"
            return kind(text)
        except (TypeError, ValueError):
            raise ConfigError(f"--space {key}: {text!r} is not a {kind.__name__}") from None

    def check(v: Any) -> Any:
        try:
            base.replace(**{field_name: v}).validate()
        except ConfigError as exc:
            raise ConfigError(f"--space {key}={v}: {exc}") from None
        return v

    if isinstance(spec, dict):
        (sampler, bounds), = spec.items() if len(spec) == 1 else [(None, None)]
        if sampler not in SAMPLERS or not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise ConfigError(f"--space {key}: a range is {{uniform: [LOW, HIGH]}} or {{loguniform: [LOW, HIGH]}}")
        if kind is not float:
            raise ConfigError(f"--space {key}: only a number with decimals takes a range; give its values, such as {key}=a,b")
        low, high = (check(value(b)) for b in bounds)
        if not low < high or (sampler == "loguniform" and low <= 0):
            raise ConfigError(f"--space {key}: {sampler} needs 0 < LOW < HIGH" if sampler == "loguniform"
                              else f"--space {key}: uniform needs LOW < HIGH")
        return Dimension(field_name, sampler=sampler, low=low, high=high)
    choices = spec if isinstance(spec, (list, tuple)) else [spec]
    if not choices:
        raise ConfigError(f"--space {key}: no values")
    values = tuple(check(value(c)) for c in choices)
    if len(set(values)) != len(values):
        raise ConfigError(f"--space {key}: a value is listed twice")
    return Dimension(field_name, choices=values)


# ------------------------------------------------------------------ the record
def summarize(trials: list[dict[str, Any]], epochs: int) -> dict[str, Any] | None:
    """The best trial: the highest best validation accuracy among the trials that trained every epoch."""
    finished = [t for t in trials if t["status"] == "finished" and t["epochs"] == epochs]
    return max(finished, key=lambda t: (t["best_val_accuracy"], -int(t["name"].rsplit("-", 1)[-1])), default=None)


def trial_row(result, epochs: int) -> dict[str, Any]:
    """A Tune Result as tune.json keeps it."""
    history = result.metrics_dataframe
    reported = [] if history is None or METRIC not in history else [float(v) for v in history[METRIC].dropna()]
    trained = int(result.metrics.get("epoch", 0) or 0) if result.metrics else 0
    status = "error" if result.error else ("finished" if trained == epochs else "stopped early")
    return {"name": os.path.basename(result.path.rstrip("/")), "params": dict(result.config or {}), "status": status,
            "epochs": trained, "best_val_accuracy": max(reported, default=None),
            **({"error": str(result.error).strip().splitlines()[-1]} if result.error else {})}


def load(storage: str, name: str) -> dict[str, Any]:
    """A sweep's tune.json; one line when there is none, or no best trial yet."""
    folder = Location.of(storage) / name
    record = rundir.read_json(folder, TUNE_FILE)
    if record is None:
        raise RunError(f"{folder}: no sweep there ({TUNE_FILE} missing). Fix: the --storage and --name the sweep "
                       "was run with (mnist-dist tune ... --name NAME)")
    if record.get("status") != "finished" or not record.get("best"):
        raise RunError(f"{folder}: the sweep has {'no finished trial' if record.get('status') == 'finished' else 'not finished'}, "
                       "so it has no best trial yet. Fix: run the same mnist-dist tune command again to finish it")
    return record


def best_config(storage: str, name: str) -> TrainConfig:
    """The config the sweep's best trial trained with: its run, in the sweep's folder."""
    record = load(storage, name)
    best = record["best"]
    return TrainConfig.from_dict({**record["base"], **best["params"], "storage": str(Location.of(storage) / name),
                                  "name": best["name"]})


def check_is_sweep_or_new(folder: Location) -> None:
    names = [name for name, _ in folder.entries() if name != LOCK_FILE]
    if names and TUNE_FILE not in names:
        raise RunError(f"{folder}: holds files ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}) "
                       "but no sweep of mnist-dist, so nothing is written there. Fix: pass a new --name.")


# ------------------------------------------------------------------ the sweep
def _trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial, in its Ray Tune actor: a Ray Train run named after the trial, in the sweep's folder."""
    import ray.tune

    from mnist_dist import compat, training

    config = TrainConfig.from_dict(base).replace(name=ray.tune.get_context().get_trial_name(), **params)
    training.run(config, callbacks=[compat.tune_epoch_reports()])


def _trial_name(trial) -> str:
    return "trial-" + trial.trial_id.rsplit("_", 1)[-1]  # Tune's trial ids end in the trial's index


def run(base: TrainConfig, sweep: Sweep, log=print) -> dict[str, Any]:
    """Runs (or resumes, or finds finished) the sweep STORAGE/NAME; returns tune.json's content."""
    base = rundir.settle(base)
    folder = Location.of(base.storage) / base.name
    check_is_sweep_or_new(folder)
    shared = {k: v for k, v in base.to_dict().items() if k not in ("name", "storage")}
    with folder.lock("tune"):
        record = rundir.read_json(folder, TUNE_FILE)
        if record is not None and (record["sweep"] != sweep.to_dict() or record["base"] != shared):
            raise RunError(f"{folder}: a sweep of another space or other train options is there. Fix: the same options "
                           "to resume or see it, or a new --name")
        if record is not None and record["status"] == "finished":
            log(f"sweep {folder} is finished: nothing to run")
            print_table(record, log)
            return record
        if record is None:
            folder.make_dirs()
            record = {"status": "running", "sweep": sweep.to_dict(), "base": shared, "metric": METRIC}
            (folder / TUNE_FILE).write_json(record)
        record = {**record, **_tune(base, sweep, folder, log), "status": "finished"}
        (folder / TUNE_FILE).write_json(record)
    print_table(record, log)
    return record


def _tune(base: TrainConfig, sweep: Sweep, folder: Location, log) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mnist_dist.launcher import init_ray, keep_ray_on_loopback, stop_ray

    keep_ray_on_loopback(base)
    # A trial ASHA stops is blocked in Ray Train's fit(), which ends only when Tune kills the
    # trial's actor (and with it the run's workers): by default 10 minutes later, holding the
    # CPUs the next trials wait for. Tune's documented setting, read when the sweep starts.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "5")
    # Ray Train's placement-group cleaner frees a killed run's workers' CPUs only where the
    # State API answers, which the dashboard serves (compat.NO_DASHBOARD_ENV): the embedded
    # Ray of a sweep starts it.
    init_ray(base.replace(dashboard=True), log)
    import ray

    try:
        per_trial = base.workers * base.cpus_per_worker
        concurrent = sweep.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1)) // per_trial)
        log(f"sweep {folder}: {sweep.trials} trial(s){' or more' if any(d.choices is None for d in sweep.dimensions) and sweep.samples > 1 else ''} "
            f"of up to {base.epochs} epochs, {concurrent} at a time ({base.workers} worker(s) each); ASHA ends the poor ones "
            f"after {sweep.grace_epochs} epoch(s) or later")
        # A trial only drives its run: a CPU of its own would keep a Ray Train worker off a node
        # of one CPU. Tune wants some resource in a trial's bundle, so a byte of memory it is.
        trainable = tune.with_resources(tune.with_parameters(_trial, base={**base.to_dict(), "storage": str(folder)}),
                                        {"CPU": 0, "memory": 1})
        path = str(folder / TUNE_DIR)
        if tune.Tuner.can_restore(path):
            log(f"resuming the sweep from {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space={d.field: d.to_tune() for d in sweep.dimensions},
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", num_samples=sweep.samples, max_concurrent_trials=concurrent,
                    # A trial that trains every epoch ends by itself, its run finished (result.json);
                    # ASHA stopping it at its last epoch would cut that short.
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=sweep.grace_epochs,
                                            reduction_factor=2, stop_last_trials=False),
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(folder), verbose=1))
        grid = tuner.fit()
    finally:
        stop_ray()
    trials = sorted((trial_row(result, base.epochs) for result in grid), key=lambda t: t["name"])
    for trial in trials:
        trial["run"] = str(folder / trial["name"])
    best = summarize(trials, base.epochs)
    if best is not None:
        result = rundir.read_json(Location.of(best["run"]), rundir.RESULT_FILE) or {}
        best = {**best, "test_accuracy": result.get("test_accuracy"), "best_checkpoint": result.get("best_checkpoint")}
    return {"trials": trials, "best": best}


def print_table(record: dict[str, Any], log=print) -> None:
    fields = list(record["sweep"]["space"])
    rows = [[t["name"], *(_shown(t["params"].get(f)) for f in fields), t["status"], str(t["epochs"]),
             "" if t["best_val_accuracy"] is None else f"{100 * t['best_val_accuracy']:.2f}%"] for t in record["trials"]]
    header = ["trial", *fields, "status", "epochs", "best val acc"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        log("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    best = record.get("best")
    if best is None:
        log("no trial trained every epoch: no best trial")
        return
    values = ", ".join(f"{f}={_shown(best['params'].get(f))}" for f in fields)
    test = f", test {100 * best['test_accuracy']:.2f}%" if best.get("test_accuracy") is not None else ""
    log(f"best: {best['name']} ({values}): validation {100 * best['best_val_accuracy']:.2f}%{test}; run {best['run']}")


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
