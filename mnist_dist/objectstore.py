"""Run directories at URIs (s3://, gs://, abfs://, hdfs://): pyarrow.fs does the I/O, as in Ray Train.

A URI may carry pyarrow's options in its query (`s3://b/runs?endpoint_override=http://h:9000`),
so paths are joined before the query. Credentials and endpoints come the standard way
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, a node's role). Objects are written whole by one put;
a folder is published file by file with its commit record (report.json, say) last.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mnist_dist.results import RunError

FIX = ("Fix: check the bucket name, the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the node's role) "
       "and the endpoint (AWS_ENDPOINT_URL, or ?endpoint_override=HOST:PORT in the URI).")


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str, *names: str) -> str:
    """`location/names...`, before any `?query` of a URI."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)]) + sep + query


def name(location: str | Path) -> str:
    """The last component of a path or URI (`checkpoint_epoch002`)."""
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def without_query(uri: str) -> str:
    return uri.partition("?")[0].rstrip("/")


def filesystem(uri: str):
    """(pyarrow FileSystem, path on it) for `uri`; one line for a scheme pyarrow does not know."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
        raise RunError(f"{uri}: not a storage URI that pyarrow.fs can open ({_first_line(exc)}). "
                       "Fix: a local path, or a URI such as s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or hdfs://HOST/PATH.") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _errors(uri: str, doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise RunError(f"{uri}: {doing} failed ({_first_line(exc)}). {FIX}") from None


def check_reachable(uri: str) -> None:
    """Fail in seconds, before Ray starts, on a bucket that is missing or cannot be read."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    with _errors(uri, "reading"):
        info = fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            raise RunError(f"{uri}: is an object, not a folder. Fix: point --storage at a prefix (s3://BUCKET/runs).")
        bucket = path.split("/", 1)[0]
        if fs.type_name in ("s3", "gcs") and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise RunError(f"{uri}: bucket {bucket} does not exist. Fix: create it, or pass the right bucket. " + FIX[5:])


def read_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    fs, path = filesystem(uri)
    try:
        with _errors(uri, "reading"), fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    with _errors(uri, "writing"), fs.open_output_stream(path) as f:
        f.write(data)


def delete(uri: str) -> None:
    """Remove one object (or local file); nothing there is fine."""
    if not is_uri(uri):
        Path(uri).unlink(missing_ok=True)
        return
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError), _errors(uri, "deleting"):
        fs.delete_file(path)


def listing(uri: str) -> list[tuple[str, bool]]:
    """(name, is a file) of what is directly under `uri`; [] for nothing there."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    with _errors(uri, "listing"):
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [(info.base_name, info.type == pyarrow.fs.FileType.File) for info in infos]


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    with _errors(uri, "reading"):
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound or bool(listing(uri))


def download(uri: str, local: Path) -> Path:
    """Copy the folder (or the object) at `uri` to the local path `local`."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    with _errors(uri, "downloading"):
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            local.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local folder holding `location`'s files: the folder itself, or a temporary copy of a URI."""
    if not is_uri(location):
        yield Path(location)
        return
    if not exists(str(location)):
        raise FileNotFoundError(location)
    work = Path(tempfile.mkdtemp(prefix="mnist-dist-"))
    try:
        yield download(str(location), work / name(location))
    finally:
        shutil.rmtree(work, ignore_errors=True)
