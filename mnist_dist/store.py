"""The run store: every place mnist-dist reads or writes, on a local disk or in a bucket, as one value.

A `Location` is made once from the user's string (`runs`, `/mnt/nfs/runs`,
`s3://bucket/runs?endpoint_override=host:9000`), as Ray Train keeps one storage context for
`/tmp/ray_results` and `s3://...` alike. Reads, writes, listings, copies and existence
checks all go through it and mean the same on either kind (tests/test_store.py runs each on
both): a URI through pyarrow.fs, the local disk through the os module, which the edge
install (no pyarrow) can use to predict from local files. Three things truly differ by
kind, each behind one method:

- `lock`: an OS lock on a local disk; an owner object with a heartbeat in a bucket;
- `publish`: a folder swapped in by rename locally; in a bucket, file by file with its
  commit record last;
- `mirror`: TensorBoard's event files, written locally and put into a bucket.

A URI may carry pyarrow's options in its query, so names are joined before the query.
Credentials and endpoints come the standard way (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, a
node's role). No other module asks whether a location is a URI.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_dist.errors import RunError

class StorageError(RunError):
    """Storage that failed under a read or a write; `reason` is the bare cause (Permission denied)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # whole across processes: a Ray worker's raises it, its driver reads it
        return type(self), (str(self), self.reason)


BUCKET_FIX = ("Fix: check the bucket name, the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the node's "
              "role) and the endpoint (AWS_ENDPOINT_URL, or ?endpoint_override=HOST:PORT in the URI).")
FOLDER_FIX = "Fix: make it writable or free space there, or name another place (--storage, --out)."


def is_uri(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def basename(text: str | os.PathLike) -> str:
    """The last component of a path or URI (`checkpoint_epoch002`), whatever its kind."""
    return str(text).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Location:
    """A file or folder: an absolute local path, or a URI (`s3://bucket/prefix?query`)."""

    uri: str

    @classmethod
    def of(cls, where: Where) -> Location:
        """From the user's string: relative paths against this directory, `~` expanded, file:// dropped."""
        if isinstance(where, Location):
            return where
        text = str(where).removeprefix("file://")
        if is_uri(text):
            base, sep, query = text.partition("?")
            return cls(base.rstrip("/") + sep + query)  # s3://b/runs/ is s3://b/runs
        return cls(os.path.abspath(os.path.expanduser(text)))  # links kept: `is_symlink` must still see them

    def __str__(self) -> str:
        return self.uri

    def _split(self) -> tuple[str, str]:
        """(path, "?query"); only a URI has a query, a local name may hold a `?`."""
        if self._local:
            return self.uri, ""
        base, sep, query = self.uri.partition("?")
        return base, sep + query

    def __truediv__(self, name: str) -> Location:
        base, query = self._split()
        return Location("/".join([base.rstrip("/"), name.strip("/")]) + query)

    @property
    def name(self) -> str:
        return self._split()[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        base, query = self._split()
        head = base.rstrip("/").rsplit("/", 1)[0]
        return Location((head or "/") + query)

    @property
    def _local(self) -> bool:
        return not is_uri(self.uri)

    # ------------------------------------------------------------ pyarrow
    @functools.cached_property
    def _fs(self):
        """(pyarrow FileSystem, path on it) of a URI; one line for a scheme pyarrow does not know."""
        import pyarrow.fs

        try:
            return pyarrow.fs.FileSystem.from_uri(self.uri)
        except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
            raise RunError(f"{self.uri}: not a storage URI that pyarrow.fs can open ({_first_line(exc)}). Fix: a local "
                           "path, or a URI such as s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or hdfs://HOST/PATH.") from None

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """An OS or storage error as one line naming the location and the fix; a missing file passes."""
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise  # for the caller: nothing there, or not what it looked for
        except OSError as exc:
            reason = (exc.strerror if self._local else None) or _first_line(exc)
            raise StorageError(f"{self.uri}: {doing} failed ({reason}). {FOLDER_FIX if self._local else BUCKET_FIX}",
                               reason) from None

    def failed_in(self, error: BaseException | None) -> bool:
        """Whether `error` is of a read or write here: the store's, or an OS error (pyarrow's are
        OSErrors too) that names this place or one below it."""
        return isinstance(error, (StorageError, OSError)) and self.named_in(error)

    def named_in(self, error: BaseException) -> bool:
        """Whether an error is about this location or a place below it: an OSError's filename,
        or the message (a StorageError's names its location; pyarrow's name the path, or for a
        bucket the key and the bucket apart)."""
        filename = getattr(error, "filename", None)
        if filename:
            return self.contains(Location.of(str(filename)))
        text, path = str(error), self._split()[0].rstrip("/")
        if self._local:
            return path in text or os.path.realpath(path) in text
        bucket_and_key = path.split("://", 1)[-1]
        key = bucket_and_key.partition("/")[2]
        return bucket_and_key in text or bool(key) and f"{key}/" in text

    def failure(self, error: BaseException) -> tuple[str, str]:
        """(the bare cause, the fix) of an error met writing here: a StorageError, an OSError
        of the os module, or pyarrow's (whose message is the cause)."""
        if isinstance(error, StorageError):
            reason = error.reason
        else:
            reason = (getattr(error, "strerror", None) if self._local else None) or _first_line(error)
        fix = ("make it writable, or free space there" if self._local
               else "check that the object store answers and accepts writes (the endpoint, the credentials)")
        return reason, fix

    def _kind(self) -> str:
        """"file", "dir" or "missing" (links followed)."""
        if self._local:
            return "file" if os.path.isfile(self.uri) else "dir" if os.path.isdir(self.uri) else "missing"
        import pyarrow.fs

        fs, path = self._fs
        with self._errors("reading"):
            kind = fs.get_file_info(path).type
        if kind == pyarrow.fs.FileType.File:
            return "file"
        return "dir" if kind == pyarrow.fs.FileType.Directory or self.entries() else "missing"

    # ------------------------------------------------------------ questions
    def exists(self) -> bool:
        return self._kind() != "missing"

    def is_file(self) -> bool:
        return self._kind() == "file"

    def is_dir(self) -> bool:
        """A folder, or a bucket prefix that holds objects."""
        return self.exists() and not self.is_file()

    def is_symlink(self) -> bool:
        return self._local and Path(self.uri).is_symlink()  # buckets have no links

    def contains(self, other: Location) -> bool:
        """Whether `other` is this location or lies below it."""
        mine, theirs = (x._split()[0].rstrip("/") if not x._local else os.path.realpath(x.uri)
                        for x in (self, other))
        return theirs == mine or theirs.startswith(mine.rstrip("/") + "/")

    def entries(self) -> list[tuple[str, bool]]:
        """(name, is a plain file) of what is directly inside; [] for nothing there. A link is no plain file."""
        if self._local:
            with self._errors("listing"):
                if not Path(self.uri).is_dir():
                    return []
                return [(e.name, e.is_file(follow_symlinks=False)) for e in os.scandir(self.uri)]
        import pyarrow.fs

        fs, path = self._fs
        with self._errors("listing"):
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return [(info.base_name, info.type == pyarrow.fs.FileType.File) for info in infos]

    # ------------------------------------------------------------ reading and writing
    def read_bytes(self) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        try:
            with self._errors("reading"):
                if self._local:
                    return Path(self.uri).read_bytes()
                fs, path = self._fs
                with fs.open_input_stream(path) as f:
                    return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_json(self) -> Any:
        """The parsed JSON document, None when absent; a ValueError for one that does not parse."""
        data = self.read_bytes()
        return None if data is None else json.loads(data)

    def write_bytes(self, data: bytes) -> None:
        """Written whole or not at all: temp file, fsync and rename locally; one put in a bucket."""
        if self._local:
            target = Path(self.uri)
            with self._errors("writing"):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
            return
        fs, path = self._fs
        with self._errors("writing"), fs.open_output_stream(path) as f:
            f.write(data)

    def write_json(self, payload: Any) -> None:
        self.write_bytes(json.dumps(payload, indent=2, sort_keys=True).encode())

    def delete(self) -> None:
        """Remove one file; nothing there is fine."""
        with contextlib.suppress(FileNotFoundError), self._errors("deleting"):
            if self._local:
                Path(self.uri).unlink()
            else:
                fs, path = self._fs
                fs.delete_file(path)

    def delete_tree(self, commit: str | None = None) -> None:
        """Remove a folder and everything in it; nothing there is fine. Its `commit` record goes
        first, so that a delete cut off midway leaves nothing that passes for whole."""
        if commit:
            (self / commit).delete()
        with contextlib.suppress(FileNotFoundError), self._errors("deleting"):
            if self._local:
                shutil.rmtree(self.uri)
            else:
                fs, path = self._fs
                fs.delete_dir(path)

    def make_dirs(self) -> None:
        """The folder and its parents (a bucket needs none)."""
        if self._local:
            with self._errors("writing"):
                Path(self.uri).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local path holding this location's files: the path itself, or a temporary download.
        FileNotFoundError when nothing is there."""
        if self._local:
            if not Path(self.uri).exists():
                raise FileNotFoundError(self.uri)
            yield Path(self.uri)
            return
        import pyarrow.fs

        if not self.exists():
            raise FileNotFoundError(self.uri)
        fs, path = self._fs
        work = Path(tempfile.mkdtemp(prefix="mnist-dist-"))
        try:
            local = work / self.name
            with self._errors("downloading"):
                if not self.is_file():
                    local.mkdir()
                pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
            yield local
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------ publish: a folder swapped in whole
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private local folder to build what `publish` will put here; removed afterwards.

        Locally it sits beside this location, so publishing is a rename on one filesystem
        (tmpfs /tmp, or a run on NFS, would otherwise make it a copy).
        """
        if self._local:
            parent = Path(self.uri).parent
            with self._errors("writing"):
                parent.mkdir(parents=True, exist_ok=True)
                work = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=parent))
        else:
            work = Path(tempfile.mkdtemp(prefix=f"mnist-dist-{self.name}-"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def publish(self, staged: Path, commit: str, first: str | None = None) -> None:
        """Put the folder `staged` (from `staging`) here, replacing what is here.

        Locally, what was here is moved aside by rename and its files deleted only once the
        new folder is in place: a crash leaves the old or the new one. A bucket has no rename,
        so the prefix changes file by file: `first` (a marker) first; the old `commit` record
        before the old files; the new one after the new files. Cut off at any point, the prefix
        holds no commit record, so nothing takes it for a finished one. The caller has checked
        that what is here may be replaced (mnist_dist.ownership).
        """
        if self._local:
            target = Path(self.uri)
            # mkdtemp made it private; what is published is meant to be shared. A mount that sets
            # modes itself refuses a chmod to a non-owner (SMB: Azure Files mounts as uid 0).
            with contextlib.suppress(PermissionError):
                staged.chmod(0o755)
            if not target.exists():
                staged.rename(target)
                return
            if not any(target.iterdir()):
                target.rmdir()
                staged.rename(target)
                return
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(backup)
            staged.rename(target)
            for entry in backup.iterdir():  # only the kind's own files, as the caller checked
                entry.unlink()
            backup.rmdir()
            return
        old = [name for name, _ in self.entries() if name != first]
        if first is not None:
            (self / first).write_bytes((staged / first).read_bytes())
        for name in sorted(old, key=lambda n: n != commit):  # the commit record first
            (self / name).delete()
        for file in sorted((p for p in staged.iterdir() if p.is_file() and p.name != first), key=lambda p: p.name == commit):
            (self / file.name).write_bytes(file.read_bytes())

    # ------------------------------------------------------------ mirror: TensorBoard's events
    def mirror(self) -> Mirror:
        """A local folder whose files `Mirror.sync` puts here (a local location is its own)."""
        return Mirror(self)

    # ------------------------------------------------------------ lock: one writer
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """One writer: an exclusive lock on THIS/.lock for as long as the command runs.

        A process that already holds it takes it again for free (the pipeline's export after
        its training). Locally the kernel drops the lock when its process dies, however it
        dies, so a killed command's lock is simply taken by the next one. A bucket has no
        lock to take: there it is an owner object with a heartbeat (`_bucket_lock`).
        """
        if self._key in _held:
            yield
            return
        lock = _bucket_lock if not self._local else _os_lock
        with lock(self, command):
            _held[self._key] = command
            try:
                yield
            finally:
                del _held[self._key]

    @property
    def _key(self) -> str:
        """The same for every spelling of one folder (a link, a relative path)."""
        return os.path.realpath(self.uri) if self._local else self._split()[0].rstrip("/")

    # ------------------------------------------------------------ reachability
    def check_reachable(self) -> None:
        """Fail in seconds, before Ray starts, on storage that is a file, or a bucket that is missing or unreadable."""
        if self.is_file():
            raise RunError(f"{self.uri}: is a file, not a folder. Fix: point --storage at a folder (or a prefix, s3://BUCKET/runs).")
        if self._local:
            return
        import pyarrow.fs

        fs, path = self._fs
        bucket = path.split("/", 1)[0]
        if fs.type_name in ("s3", "gcs"):
            with self._errors("reading"):
                if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                    raise RunError(f"{self.uri}: bucket {bucket} does not exist. Fix: create it, or pass the right bucket. "
                                   + BUCKET_FIX[5:])

    def check_shared(self, node_hosts: set[str], mounts: str | None = None, flag: str = "--storage") -> None:
        """Refuse a folder on one node's own disk when the cluster spans several hosts.

        Ray Train fails only when a worker on another host reports its first checkpoint, after
        training has started; nodes on one host (as in the tests) share its disks.
        """
        if not self._local or len(node_hosts) <= 1:
            return
        kind = filesystem_type(self.uri, mounts)
        if kind in SHARED_FILESYSTEMS or kind.startswith("fuse"):
            return
        hosts = ", ".join(sorted(node_hosts)[:3]) + (", ..." if len(node_hosts) > 3 else "")
        doing = "write their checkpoints there" if flag == "--storage" else "read it"
        raise RunError(f"{flag} {self.uri} is on this node's own {kind} filesystem, but the cluster's nodes are on "
                       f"{len(node_hosts)} hosts ({hosts}): workers elsewhere cannot {doing}. "
                       f"Fix: an NFS path mounted on every node, or a URI ({flag} s3://BUCKET/runs/..., gs://...).")


# What a user or a caller may name a location by: a path, a URI, or a Location already made.
Where = str | os.PathLike | Location


class Mirror:
    """TensorFlow cannot append to an object store without tensorflow-io, so a bucket's
    events are written to a local folder and put whole into the bucket at every `sync`."""

    def __init__(self, location: Location):
        self.location = location
        self.remote = not location._local
        self.path = Path(tempfile.mkdtemp(prefix="mnist-dist-events-")) if self.remote else Path(location.uri)

    def sync(self) -> None:
        if self.remote:
            for file in self.path.iterdir():
                (self.location / file.name).write_bytes(file.read_bytes())

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------- the two locks
LOCK_FILE = ".lock"
_held: dict[str, str] = {}  # the folders whose lock this process holds -> the command that took it
# A bucket lock's holder rewrites it every HEARTBEAT_S; one not rewritten for STALE_S
# belongs to a process that died (a killed driver, a deleted pod) and is taken over.
HEARTBEAT_S, STALE_S, SETTLE_S = 5.0, 30.0, 1.0
RELEASE_WAIT_S = 10.0  # for the release of the lock of a run that failed


def _holder(command: str) -> str:
    import socket

    return f"`mnist-dist {command}` (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})"


def _process_identity(pid: int) -> dict[str, Any] | None:
    """What tells a process apart on Linux even across hosts that share a name and pids that
    are reused: the boot, the pid namespace, and the process's start time; None elsewhere."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return {"boot": boot, "pid_namespace": namespace, "pid": pid, "started": started}


def _died_here(current: dict[str, Any]) -> bool:
    """Whether a bucket lock's holder ran in this very boot and pid namespace, and its process
    is gone (no process with its pid and start time): then its lock is stale at once, rather
    than STALE_S after its last heartbeat. A run whose storage failed could not delete its
    lock; its re-run, here, need not wait. Anything unsure (another machine or container,
    another OS) leaves the lock to go stale."""
    holder = current.get("process")
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return False
    mine = _process_identity(os.getpid())
    if mine is None or (holder.get("boot"), holder.get("pid_namespace")) != (mine["boot"], mine["pid_namespace"]):
        return False
    return _process_identity(holder["pid"]) != holder  # gone, or its pid now another process's


@contextlib.contextmanager
def _os_lock(location: Location, command: str) -> Iterator[None]:
    import fcntl

    try:
        Path(location.uri).mkdir(parents=True, exist_ok=True)
        handle = open(Path(location.uri) / LOCK_FILE, "a+")
    except OSError as exc:
        raise RunError(f"{location}: cannot write the run directory ({exc.strerror or exc}). {FOLDER_FIX}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(f"{location}: in use by {holder}. Fix: wait for that command to finish, or pass another --name.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(_holder(command) + "\n")  # names the holder for the one-line refusal a second writer gets
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # releases the lock; the file stays, naming the last holder


def _read_lock(lock: Location) -> dict[str, Any] | None:
    try:
        content = lock.read_json()
    except ValueError:
        return None  # a torn or foreign object is no live holder
    return content if isinstance(content, dict) and isinstance(content.get("heartbeat"), (int, float)) else None


@contextlib.contextmanager
def _bucket_lock(location: Location, command: str) -> Iterator[None]:
    """Two writers that race for a free lock both write it; each reads it back SETTLE_S later,
    and only the one whose token is there goes on. While it runs, a daemon thread renews the
    heartbeat; the lock is deleted at the end, and a dead holder's lock goes stale."""
    import threading
    import uuid

    lock, token, holder = location / LOCK_FILE, uuid.uuid4().hex, _holder(command)

    def refuse(current: dict[str, Any]) -> RunError:
        age = time.time() - current["heartbeat"]
        return RunError(f"{location}: in use by {current.get('holder', 'another process')} (heartbeat {age:.0f} s ago). "
                        f"Fix: wait for that command to finish, or pass another --name (the lock of a holder that died "
                        f"expires {STALE_S:.0f} s after its last heartbeat).")

    identity = _process_identity(os.getpid())

    def beat() -> None:
        lock.write_json({"holder": holder, "token": token, "heartbeat": time.time(), "process": identity})

    current = _read_lock(lock)
    if current is not None and time.time() - current["heartbeat"] < STALE_S and not _died_here(current):
        raise refuse(current)
    beat()
    time.sleep(SETTLE_S)
    current = _read_lock(lock)
    if current is None or current.get("token") != token:
        raise refuse(current or {"heartbeat": time.time()})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(StorageError):  # the store not answering: the run itself will say so
                if (_read_lock(lock) or {}).get("token") == token:
                    beat()

    thread = threading.Thread(target=renew, name="mnist-dist-run-lock", daemon=True)
    thread.start()

    def release() -> None:
        with contextlib.suppress(StorageError):
            if (_read_lock(lock) or {}).get("token") == token:
                lock.delete()

    try:
        yield
    except BaseException as exc:
        # The lock of a holder that is gone is taken over (`_died_here`, STALE_S), so a run
        # that failed need not wait on its store: not at all when that store itself failed
        # (a hung request would hold the exit for minutes), RELEASE_WAIT_S otherwise.
        stop.set()
        if not isinstance(exc, StorageError):
            releasing = threading.Thread(target=lambda: (thread.join(), release()), name="mnist-dist-run-unlock",
                                         daemon=True)
            releasing.start()
            releasing.join(timeout=RELEASE_WAIT_S)
        raise
    stop.set()
    thread.join()
    release()


# ---------------------------------------------------------------- node-local disks
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
