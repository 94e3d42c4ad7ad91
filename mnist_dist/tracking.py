"""MLflow, optional (`--mlflow URI` or MLFLOW_TRACKING_URI; the `mlflow` extra): a run's
record (its config as parameters, each epoch's metrics, the test score) and a verified
export as a registered model version (docs/registry.md).

The driver logs from the run's own files once a command has finished: workers need no route
to the server, and what an MLflow outage costs is the record, never the training. A command
run again adds only what is new: the run folder's mlflow.json remembers the MLflow run, the
epochs logged and the versions registered.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mnist_dist.config import ConfigError
from mnist_dist.errors import RunError
from mnist_dist.store import Location

EXPERIMENT = "mnist-dist"
STATE = "mlflow.json"
EPOCH_METRICS = ("val_accuracy", "val_loss", "train_loss", "learning_rate", "images_per_second", "epoch_train_seconds")
# Ask the server once, quickly: MLflow's default is 7 retries with backoff, minutes for a typo.
PREFLIGHT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# After the command's work, a few tries, not MLflow's minutes of backoff before the one line.
LOGGING_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def tracking_uri(flag: str | None) -> str | None:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or None


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _one_line(method):
    """An MLflow failure after the command's work is one line: the run and its export are whole,
    and the same command run again logs what is missing."""
    @functools.wraps(method)
    def logged(self, *args, **kwargs):
        try:
            with _env(LOGGING_ENV):
                return method(self, *args, **kwargs)
        except (ConfigError, RunError):
            raise
        except Exception as exc:
            raise RunError(f"mlflow at {self.uri}: {_first_line(exc)}. The run and its export are whole. Fix: once the "
                           "server answers, run the same command again to log what is missing") from None
    return logged


class Tracker:
    """One MLflow tracking server (and its registry), checked reachable when made."""

    def __init__(self, uri: str, model_name: str = "mnist", log=print):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError("--mlflow needs the MLflow client, which is not installed. "
                              "Fix: pip install \"mnist-dist[mlflow]\", or leave out --mlflow") from None
        self.uri, self.model_name, self.log = uri, model_name, log
        with _env(PREFLIGHT_ENV):
            try:  # a URI MLflow refuses outright (a file store, say) fails here already
                self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                self.client.search_experiments(max_results=1)
            except Exception as exc:  # whatever the store raises: a bad URI, a refused port, a 500
                raise ConfigError(f"--mlflow {uri}: the MLflow tracking server does not answer ({_first_line(exc)}). "
                                  "Fix: start it (mlflow server), or correct the URI") from None

    # ------------------------------------------------------------ runs
    def _state(self, folder: Location) -> dict[str, Any]:
        path = folder / STATE
        state = path.read_json() if path.exists() else None
        # Another server's ids mean nothing here: a record starts afresh on this one.
        return state if isinstance(state, dict) and state.get("tracking_uri") == self.uri else {"tracking_uri": self.uri}

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        return experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)

    def _open(self, state: dict[str, Any], where: Location | None, name: str, params: dict[str, Any],
              tags: dict[str, str], start_ms: int | None = None) -> str:
        """The MLflow run of `state`, or a new one with these parameters, whose id is saved in
        `where` at once: a command that fails after this finds it again."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if state.get("run_id"):
            try:
                if self.client.get_run(state["run_id"]).info.lifecycle_stage == "active":
                    return state["run_id"]
            except MlflowException as exc:  # deleted on the server: a new one; anything else is raised
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        run = self.client.create_run(self._experiment_id(), start_time=start_ms, run_name=name, tags=tags)
        state.update(run_id=run.info.run_id, epochs_logged=0, versions={})
        if where is not None:
            (where / STATE).write_json(state)
        # Parameters are fixed once logged: a later command's changed ones (more epochs) are in
        # result.json, which is logged again as an artifact.
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        return run.info.run_id

    @_one_line
    def record(self, run: Location, parent: str | None = None) -> str:
        """Logs the finished run at `run` (from its result.json); returns the MLflow run id."""
        from mlflow.entities import Metric

        result = (run / "result.json").read_json()
        state = self._state(run)
        tags = {"mnist_dist.run_dir": str(run), **({"mlflow.parentRunId": parent} if parent else {})}
        history = result["history"]
        started = history[0]["finished_at"] - history[0].get("epoch_train_seconds", 0) if history else None
        run_id = self._open(state, run, run.name, result["config"], tags, int(started * 1000) if started else None)
        new = [h for h in history if h["epoch"] > state.get("epochs_logged", 0)]
        metrics = [Metric(key, float(h[key]), int(h.get("finished_at", 0) * 1000), h["epoch"])
                   for h in new for key in EPOCH_METRICS if isinstance(h.get(key), (int, float))]
        last = result["epochs_completed"]
        if new:  # the command trained: its test score, at its last epoch
            now = int(time.time() * 1000)
            metrics += [Metric(key, float(result[key]), now, last)
                        for key in ("test_accuracy", "test_loss", "best_val_accuracy", "best_epoch") if result.get(key) is not None]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "result.json").write_bytes((run / "result.json").read_bytes())
            self.client.log_artifact(run_id, str(Path(scratch) / "result.json"))
        ended = history[-1].get("finished_at") if history else None
        self.client.set_terminated(run_id, "FINISHED", end_time=int(ended * 1000) if ended else None)
        state["epochs_logged"] = last
        (run / STATE).write_json(state)
        self.log(f"mlflow: run {run_id} in experiment {EXPERIMENT} at {self.uri} ({len(new)} new epoch(s) logged)")
        return run_id

    @_one_line
    def record_sweep(self, folder: Location, sweep: dict[str, Any]) -> str:
        """Logs a finished sweep (its tune.json) as a run whose children are its trials: a
        trial that trained every epoch with its whole record, one stopped early with what it
        reached."""
        state = self._state(folder)
        parent = self._open(state, folder, folder.name, {"space": sweep["sweep"]["space"], **sweep["base"]},
                            {"mnist_dist.sweep_dir": str(folder)})
        stopped = state.setdefault("stopped_trials", {})  # a stopped trial's child run, by trial name
        for trial in sweep["trials"]:
            run = Location.of(trial["run"])
            if (run / "result.json").exists():
                self.record(run, parent=parent)
                continue
            if trial["name"] in stopped:
                continue
            child = self._open({"tracking_uri": self.uri}, None, trial["name"], trial["params"],
                               {"mlflow.parentRunId": parent, "mnist_dist.status": trial["status"]})
            stopped[trial["name"]] = child
            (folder / STATE).write_json(state)
            if trial["best_val_accuracy"] is not None:
                self.client.log_metric(child, "best_val_accuracy", trial["best_val_accuracy"], step=trial["epochs"])
            self.client.set_terminated(child, "KILLED" if trial["status"] == "stopped early" else "FAILED")
        best = sweep.get("best")
        if best and state.get("best_trial") != best["name"]:
            self.client.log_metric(parent, "best_val_accuracy", best["best_val_accuracy"])
            self.client.set_tag(parent, "mnist_dist.best_trial", best["name"])
            state["best_trial"] = best["name"]
            (folder / STATE).write_json(state)
        self.client.set_terminated(parent, "FINISHED")
        self.log(f"mlflow: sweep run {parent} with {len(sweep['trials'])} trial run(s) at {self.uri}")
        return parent

    # ------------------------------------------------------------ the registry
    @_one_line
    def register(self, run: Location, export_dir: Location, report: dict[str, Any]) -> str | None:
        """Registers the verified export at `export_dir` as a version of the model, once;
        returns the version. An export that failed verification is never registered."""
        if report.get("verified") is not True:
            self.log("mlflow: the export failed verification; nothing is registered")
            return None
        state = self._state(run)
        digest = report["fp32"]["sha256"]
        # The same model.onnx re-exported with its int4 file is another set of files to ship.
        key = f"{self.model_name}@{digest}" + (f"+{report['int4']['sha256']}" if "int4" in report else "")
        if key in state.get("versions", {}):
            version = state["versions"][key]
            self.log(f"mlflow: this export is already {self.model_name} version {version}")
            return version
        run_id = state.get("run_id") or self.record(run)
        state = self._state(run)
        # Each export in a folder of its own: a later export of the run (trained on) must not
        # replace the files of a version already registered.
        folder = f"export/{digest[:12]}" + ("-int4" if "int4" in report else "")
        with export_dir.local_copy() as local:
            self.client.log_artifacts(run_id, str(local), artifact_path=folder)
            description = (local / "report.md").read_text() if (local / "report.md").exists() else ""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(self.model_name, f"runs:/{run_id}/{folder}", run_id=run_id,
                                                   tags=verification_tags(report), description=description).version
        state.setdefault("versions", {})[key] = version
        (run / STATE).write_json(state)
        self.log(f"mlflow: registered {self.model_name} version {version} (models:/{self.model_name}/{version})")
        return version

    def _version(self, model_uri: str):
        """The model version `models:/NAME/VERSION` or `models:/NAME@ALIAS` names."""
        name, _, rest = model_uri.removeprefix("models:/").partition("/")
        name, _, alias = name.partition("@")
        return self.client.get_model_version_by_alias(name, alias) if alias else self.client.get_model_version(name, rest)

    def fetch(self, model_uri: str, into: Path) -> Path:
        """The files of a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`), in
        `into`, checked against the fp32 SHA-256 the version was registered with."""
        import hashlib

        # Through this client alone: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI
        # in os.environ, for every later command of a process that uses this as a library.
        with _env(LOGGING_ENV):
            try:
                version = self._version(model_uri)
                # A copy (MlflowClient.copy_model_version, a promotion) points at the version it copied.
                source, hops = version.source, 0
                while source.startswith("models:/") and hops < 5:
                    source, hops = self._version(source).source, hops + 1
            except Exception as exc:
                raise ConfigError(f"--model {model_uri}: MLflow at {self.uri} cannot give it ({_first_line(exc)}). "
                                  "Fix: a registered model's version or alias, as the MLflow UI lists them") from None
            if not source.startswith("runs:/"):
                raise RunError(f"--model {model_uri}: its files are at {source}, not in a run's artifacts as "
                               "`mnist-dist pipeline --mlflow` registers an export. Fix: a version that pipeline registered")
            run_id, _, path = source.removeprefix("runs:/").partition("/")
            try:
                local = Path(self.client.download_artifacts(run_id, path, str(into)))
            except Exception as exc:
                raise RunError(f"--model {model_uri}: MLflow at {self.uri} cannot give its files ({_first_line(exc)}). "
                               "Fix: check that the server reaches its artifact store, then run the same command again") from None
        from mnist_edge.runtime import FP32_FILE, INT4_FILE, INT8_FILE

        # Every model file the version has a digest tag for is the one registered.
        for precision, file in (("fp32", FP32_FILE), ("int8", INT8_FILE), ("int4", INT4_FILE)):
            expected = version.tags.get(f"{precision}.sha256")
            if precision != "fp32" and expected is None:
                continue  # registered before it was tagged, or an export without int4
            model = local / file
            if not model.is_file() or hashlib.sha256(model.read_bytes()).hexdigest() != expected:
                raise RunError(f"--model {model_uri}: the files MLflow gave are not the export registered as that version "
                               f"({file} missing, or not the SHA-256 of its tag {precision}.sha256). Fix: register the export again")
        return local


def verification_tags(report: dict[str, Any]) -> dict[str, str]:
    """The figures a device owner checks before shipping, as the version's tags."""
    tags = {"verified": "true", "checkpoint": report["checkpoint"], "model": report["model"],
            "test_images": str(report["test_images"])}
    for precision in ("fp32", "int8", *(["int4"] if "int4" in report else [])):
        figures = report[precision]
        tags |= {f"{precision}.test_accuracy": f"{figures['ort_accuracy']:.4f}", f"{precision}.sha256": figures["sha256"],
                 f"{precision}.size_bytes": str(figures["size_bytes"]),
                 f"{precision}.argmax_disagreements": str(figures["argmax_disagreements"]),
                 f"{precision}.max_abs_logit_diff": f"{figures['max_abs_logit_diff']:.3g}"}
    tags |= {f"rule.{rule['rule']}": rule["detail"][:5000] for rule in report["rules"]}
    return tags
