"""A run directory across commands: what a re-run of the same --name may do.

The first command that trains a run writes its `config.json`. A later one with the same
--name continues the run only if it trains the same thing: it may change how long and how
(more epochs, other CPUs, another cluster), not what (the model, the batch, the rates, the
data). A finished run named again trains nothing and starts no worker.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator

from mnist_dist import objectstore
from mnist_dist.config import TrainConfig
from mnist_dist.results import RESULT_FILE, RunError, write

CONFIG_FILE = "config.json"
# What a re-run may change without changing what the run trains.
MAY_CHANGE = frozenset({"epochs", "eval_every", "steps_per_execution", "probe_test", "data_dir", "cpus_per_worker",
                        "gpus_per_worker", "pin_cpus", "address", "dashboard", "expose_ray", "storage", "name", "max_failures",
                        "keep_checkpoints"})


def storage_path(storage: str) -> str:
    """Ray wants an absolute local path or a URI (s3://, gs://, NFS mount path); file:// is a local path."""
    if storage.startswith("file://"):
        storage = storage.removeprefix("file://")
    return storage if objectstore.is_uri(storage) else str(Path(storage).expanduser().resolve())


def run_dir(config: TrainConfig) -> str:
    return objectstore.join(storage_path(config.storage), config.name)


def read_json(run_dir: str, name: str) -> dict[str, Any] | None:
    """A JSON file of the run directory (a local path or a URI), or None when it is absent."""
    try:
        if not objectstore.is_uri(run_dir):
            return json.loads((Path(run_dir) / name).read_text())
        data = objectstore.read_bytes(objectstore.join(run_dir, name))
        return None if data is None else json.loads(data)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as exc:
        raise RunError(f"{objectstore.join(run_dir, name)}: not valid JSON ({exc}). Fix: pass a new --name, or restore the file.") from None


def settle(config: TrainConfig) -> TrainConfig:
    """The config with its run named and its paths absolute, settled in the driver."""
    config = config.replace(name=config.name or time.strftime("mnist-%Y%m%d-%H%M%S"),
                            storage=storage_path(config.storage)).validate()
    if objectstore.is_uri(config.storage):
        objectstore.check_reachable(config.storage)  # a wrong bucket or endpoint fails here, not after training
    if not config.synthetic:
        from mnist_dist.data import settle_dir
        config = config.replace(data_dir=settle_dir(config.data_dir))  # bad data fails here, in seconds
    return config


def differences(saved: TrainConfig, asked: TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in MAY_CHANGE and getattr(saved, f.name) != getattr(asked, f.name)]


def claim(config: TrainConfig) -> dict[str, Any] | None:
    """Check that `config` may train its run; returns result.json when the run already has
    every epoch asked for (nothing to train), else None, with config.json (re)written."""
    directory = run_dir(config)
    saved = read_json(directory, CONFIG_FILE)
    if saved is None:  # a run from before config.json: its result.json knows the config
        saved = (read_json(directory, RESULT_FILE) or {}).get("config")
    if saved is not None:
        saved_config = TrainConfig.from_saved(saved)
        changed = differences(saved_config, config)
        if changed:
            theirs = ", ".join(f"{name}={getattr(saved_config, name)!r}" for name in changed)
            ours = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
            raise RunError(f"{directory}: this run was trained with {theirs}; this command asks for {ours}, which cannot "
                           "continue it. Fix: pass a new --name for a new run, or the run's own settings to continue it "
                           "(only epochs, workers' CPUs and GPUs, cluster and checkpoint settings may change).")
    result = read_json(directory, RESULT_FILE)
    if result is not None and result.get("epochs_completed", 0) >= config.epochs:
        return result
    try:
        if not objectstore.is_uri(directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
        write(directory, CONFIG_FILE, config.to_dict())
    except OSError as exc:
        raise RunError(f"{directory}: cannot write the run directory ({exc.strerror or exc}). "
                       "Fix: point --storage at a writable folder (or a URI) and --name at a new or earlier run.") from None
    return None


def already_finished(result: dict[str, Any], log=print) -> dict[str, Any]:
    log(f"run {result['run_dir']} already has {result['epochs_completed']} epochs: nothing to train "
        f"(best epoch {result['best_epoch']}, validation accuracy {100 * result['best_val_accuracy']:.2f}%, "
        f"test accuracy {100 * result['test_accuracy']:.2f}%). Pass --epochs N above {result['epochs_completed']} to train on.")
    return result


LOCK_FILE = ".lock"
_held: dict[str, Any] = {}  # run directory -> open lock file, for the process that holds it


@contextlib.contextmanager
def locked(directory: str, command: str, create: bool = True) -> Iterator[None]:
    """One writer per run: an exclusive OS lock on RUN/.lock for as long as the command runs.

    The kernel drops the lock when its process dies, however it dies, so a lock left by a
    killed command is simply taken by the next one (a retried Ray job included). The file
    names the holder for the one-line refusal a second writer gets. A process that already
    holds the lock (the pipeline's export after its training) takes it again for free.
    A URI has no OS lock: there the lock is an owner object with a heartbeat (`_locked_uri`).
    """
    uri = objectstore.is_uri(directory)
    if directory in _held or not (create or (objectstore.exists(directory) if uri else Path(directory).is_dir())):
        yield  # (a missing run is for the command itself to report)
        return
    check_is_run_or_new(directory)  # before the lock file is written into it
    if uri:
        with _locked_uri(directory, command):
            yield
        return
    import fcntl

    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        handle = open(Path(directory) / LOCK_FILE, "a+")
    except OSError as exc:
        raise RunError(f"{directory}: cannot write the run directory ({exc.strerror or exc}). "
                       "Fix: point --storage at a writable folder (or a URI) and --name at a new or earlier run.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(f"{directory}: in use by {holder}. Fix: wait for that command to finish, or pass another --name.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(_holder(command) + "\n")
    handle.flush()
    _held[directory] = handle
    try:
        yield
    finally:
        del _held[directory]
        handle.close()  # releases the lock; the file stays, naming the last holder


# Any of these makes a folder a run directory (a run's own files, Ray Train's included).
RUN_SIGNS = ("config.json", "result.json", "best.json", "checkpoint_*", "checkpoint_manager_snapshot.json",
             ".validate_storage_marker")


def check_is_run_or_new(directory: str) -> None:
    """Refuse to train into (or lock) a folder of other files: `--storage ~ --name Documents`."""
    import fnmatch

    if objectstore.is_uri(directory):
        names = [name for name, _ in objectstore.listing(directory)]
    else:
        names = [p.name for p in Path(directory).iterdir()] if Path(directory).is_dir() else []
    names = [n for n in names if n != LOCK_FILE]
    if names and not any(fnmatch.fnmatch(n, sign) for n in names for sign in RUN_SIGNS):
        raise RunError(f"{directory}: holds files ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}) "
                       "but no run of mnist-dist, so nothing is written there. Fix: pass a new --name, or a --storage "
                       "folder kept for runs.")


def _holder(command: str) -> str:
    import os
    import socket

    return f"`mnist-dist {command}` (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})"


# A URI run's lock: its holder rewrites it every HEARTBEAT_S; one not rewritten for STALE_S
# belongs to a process that died (a killed driver, a deleted pod) and is taken over.
HEARTBEAT_S, STALE_S, SETTLE_S = 5.0, 30.0, 1.0


def _read_lock(uri: str) -> dict[str, Any] | None:
    try:
        data = objectstore.read_bytes(uri)
        lock = json.loads(data) if data is not None else None
    except ValueError:
        return None  # a torn or foreign object is no live holder
    return lock if isinstance(lock, dict) and isinstance(lock.get("heartbeat"), (int, float)) else None


@contextlib.contextmanager
def _locked_uri(directory: str, command: str) -> Iterator[None]:
    """An owner object, RUN/.lock, with a heartbeat: object stores have no lock to take.

    Two writers that race for a free lock both write it; each reads it back SETTLE_S later,
    and only the one whose token is there goes on. While it runs, a daemon thread renews the
    heartbeat; the lock is deleted at the end, and a dead holder's lock goes stale.
    """
    import threading
    import uuid

    uri, token, holder = objectstore.join(directory, LOCK_FILE), uuid.uuid4().hex, _holder(command)

    def refuse(lock: dict[str, Any]) -> RunError:
        age = time.time() - lock["heartbeat"]
        return RunError(f"{directory}: in use by {lock.get('holder', 'another process')} (heartbeat {age:.0f} s ago). "
                        f"Fix: wait for that command to finish, or pass another --name (the lock of a holder that died "
                        f"expires {STALE_S:.0f} s after its last heartbeat).")

    def beat() -> None:
        objectstore.write_bytes(uri, json.dumps({"holder": holder, "token": token, "heartbeat": time.time()}).encode())

    current = _read_lock(uri)
    if current is not None and time.time() - current["heartbeat"] < STALE_S:
        raise refuse(current)
    beat()
    time.sleep(SETTLE_S)
    current = _read_lock(uri)
    if current is None or current.get("token") != token:
        raise refuse(current or {"heartbeat": time.time()})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(HEARTBEAT_S):
            if (_read_lock(uri) or {}).get("token") == token:
                beat()

    thread = threading.Thread(target=renew, name="mnist-dist-run-lock", daemon=True)
    thread.start()
    _held[directory] = token
    try:
        yield
    finally:
        del _held[directory]
        stop.set()
        thread.join()
        if (_read_lock(uri) or {}).get("token") == token:
            objectstore.delete(uri)


# Filesystems that other hosts can mount too. FUSE mounts are object stores or network
# filesystems (s3fs, gcsfuse, blobfuse2) in practice.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p", "virtiofs")


def filesystem_type(path: str, mounts: str | None = None) -> str:
    """The type of the filesystem that holds `path`: the longest mount point above it."""
    if mounts is None:
        mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").is_file() else ""
    resolved, best, kind = Path(path).resolve(), "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and (resolved == Path(fields[1]) or Path(fields[1]) in resolved.parents) \
                and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind


def check_storage_reachable(storage: str, node_hosts: set[str], mounts: str | None = None) -> None:
    """Refuse a run directory on one node's own disk when the cluster spans several hosts.

    Ray Train fails only when a worker on another host reports its first checkpoint, after
    training has started; nodes on one host (as in the tests) share its disks.
    """
    if objectstore.is_uri(storage) or len(node_hosts) <= 1:
        return
    kind = filesystem_type(storage, mounts)
    if kind in SHARED_FILESYSTEMS or kind.startswith("fuse"):
        return
    hosts = ", ".join(sorted(node_hosts)[:3]) + (", ..." if len(node_hosts) > 3 else "")
    raise RunError(f"--storage {storage} is on this node's own {kind} filesystem, but the cluster's nodes are on "
                   f"{len(node_hosts)} hosts ({hosts}): workers elsewhere cannot write their checkpoints there. "
                   "Fix: an NFS path mounted on every node, or a URI (--storage s3://BUCKET/runs, gs://...).")
