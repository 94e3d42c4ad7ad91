"""The one rule for replacing a directory: only one that mnist-dist can prove it made.

Every directory the project may later replace (an export, a checkpoint) carries a marker
file naming its kind, and holds nothing but the files that kind writes. `replace` swaps in
a freshly staged directory only when the one in the way passes that test, or is empty;
anything else (a run directory, a folder with a user's files, a symbolic link) is refused
with one line that names the folder and the fix, whatever the flags. It imports nothing
heavy, so commands check their outputs before TensorFlow loads.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from mnist_dist import objectstore
from mnist_dist.errors import MnistDistError

MARKER = ".mnist-dist.json"
MADE_BY = "made_by"  # the key that claims a single JSON output file (check_file_replaceable)
# What each kind of directory may hold, besides the marker.
KINDS = {
    "export": ("model.onnx", "model.int8.onnx", "report.json", "report.md"),
    "checkpoint": ("model.keras", "state.json", "replica-*.json"),
    "report": ("report.md", "curves.png", "predictions.png", "confusion.png"),
}
# Files that make a folder a run directory (see results.py and Ray Train's layout).
RUN_FILES = ("best.json", "result.json", "checkpoint_epoch*", "checkpoint_manager_snapshot.json")


class OwnershipError(MnistDistError):
    """A directory mnist-dist will not replace; the message names it and the fix."""


def mark(directory: str | os.PathLike, kind: str) -> None:
    """Claim a directory being built (before its other files, so a half-written one is claimed too)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    (Path(directory) / MARKER).write_text(json.dumps({"made_by": "mnist-dist", "kind": kind}) + "\n")


def _judge(entries: list[tuple[str, bool]], marker: str | bytes | None, kind: str) -> str | None:
    """The verdict on a folder's entries, (name, is a plain file), and its marker's text."""
    if not entries:
        return None  # nothing in it to lose
    if any(fnmatch.fnmatch(name, pattern) for name, _ in entries for pattern in RUN_FILES):
        return "is a training run directory"
    try:
        claim = json.loads(marker) if marker is not None else None
    except ValueError:
        claim = None
    if not isinstance(claim, dict) or claim.get("kind") != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        return f"holds files that mnist-dist {kind} did not write (no {MARKER} marker of {article} {kind})"
    foreign = [name for name, is_file in entries
               if name != MARKER and (not is_file or not any(fnmatch.fnmatch(name, p) for p in KINDS[kind]))]
    if foreign:
        return f"holds files that mnist-dist {kind} does not write ({', '.join(sorted(foreign)[:3])})"
    return None


def why_not_replaceable(target: str | os.PathLike, kind: str, protected: tuple = ()) -> str | None:
    """None when `target` (a folder or a URI prefix) may be replaced by a new one of `kind`; else the reason."""
    if objectstore.is_uri(str(target)):
        return _why_not_replaceable_uri(str(target), kind, tuple(str(p) for p in protected))
    target = Path(target)
    if target.is_symlink():
        return "is a symbolic link, which mnist-dist never replaces"
    if not target.exists():
        return None
    if not target.is_dir():
        return "exists and is not a directory"
    resolved = target.resolve()
    for path in protected:
        if objectstore.is_uri(str(path)):
            continue
        path = Path(path).resolve()
        if path == resolved or resolved in path.parents:
            return f"is or contains {path}, which this command reads"
    entries = [(e.name, e.is_file() and not e.is_symlink()) for e in target.iterdir()]
    marker = (target / MARKER).read_bytes() if (target / MARKER).is_file() else None
    return _judge(entries, marker, kind)


def _why_not_replaceable_uri(target: str, kind: str, protected: tuple[str, ...]) -> str | None:
    bare = objectstore.without_query(target)
    for path in protected:
        path = objectstore.without_query(path)
        if path == bare or path.startswith(bare + "/"):
            return f"is or contains {path}, which this command reads"
    entries = objectstore.listing(target)
    marker = objectstore.read_bytes(objectstore.join(target, MARKER)) if (MARKER, True) in entries else None
    return _judge(entries, marker, kind)


def check_replaceable(target: str | os.PathLike, kind: str, protected: tuple = (), fix: str = "") -> None:
    reason = why_not_replaceable(target, kind, protected)
    if reason:
        raise OwnershipError(f"{target}: {reason}, so it is left as it is. Fix: {fix or 'choose another folder'}.")


def replace(staged: str | os.PathLike, target: str | os.PathLike, kind: str, protected: tuple[Path, ...] = (),
            fix: str = "") -> None:
    """Rename `staged` (a directory in `target`'s parent, so on its filesystem) to `target`.

    What was at `target` is checked again here, moved aside by rename, and deleted only
    once the new directory is in place: a crash leaves either the old or the new one.
    """
    staged, target = Path(staged), Path(target)
    check_replaceable(target, kind, protected, fix)
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
    # Only the kind's own files are in it (checked above); remove them one by one, not blindly.
    for entry in backup.iterdir():
        entry.unlink()
    backup.rmdir()


def publish_uri(staged: Path, target: str, kind: str, commit: str, protected: tuple = (), fix: str = "") -> None:
    """Upload the local folder `staged` to the URI prefix `target`, replacing what `replace` would.

    An object store has no rename, so the prefix changes file by file: the marker claims it
    first; the old commit record (`commit`, say report.json) goes before the old files, and
    the new one is written after the new files. Cut off at any point, the prefix holds no
    commit record, so nothing takes it for a finished one, and the next run may replace it.
    """
    check_replaceable(target, kind, protected, fix)
    old = [name for name, _ in objectstore.listing(target) if name != MARKER]
    objectstore.write_bytes(objectstore.join(target, MARKER), (staged / MARKER).read_bytes())
    for name in sorted(old, key=lambda n: n != commit):  # the commit record first
        objectstore.delete(objectstore.join(target, name))
    for file in sorted((p for p in staged.iterdir() if p.is_file() and p.name != MARKER), key=lambda p: p.name == commit):
        objectstore.write_bytes(objectstore.join(target, file.name), file.read_bytes())


def check_file_replaceable(path: str | os.PathLike, made_by: str, fix: str) -> None:
    """Refuse an output file that is in the way unless it is a JSON document `made_by` wrote."""
    target = Path(path)
    if target.is_symlink():
        reason = "is a symbolic link, which mnist-dist never replaces"
    elif not target.exists():
        return
    elif not target.is_file():
        reason = "exists and is not a file"
    else:
        try:
            document = json.loads(target.read_text())
        except (OSError, ValueError):
            document = None
        if isinstance(document, dict) and document.get(MADE_BY) == made_by:
            return
        reason = f"is a file that `{made_by}` did not write (it has no \"{MADE_BY}\": \"{made_by}\")"
    raise OwnershipError(f"{path}: {reason}, so it is left as it is. Fix: {fix}.")


def remove_staging(directory: str | os.PathLike) -> None:
    """Remove a temporary directory this process created itself (never a user's path)."""
    shutil.rmtree(directory, ignore_errors=True)
