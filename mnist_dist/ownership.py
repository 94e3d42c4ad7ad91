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

MARKER = ".mnist-dist.json"
# What each kind of directory may hold, besides the marker.
KINDS = {
    "export": ("model.onnx", "model.int8.onnx", "report.json", "report.md"),
    "checkpoint": ("model.keras", "state.json", "replica-*.json"),
}
# Files that make a folder a run directory (see results.py and Ray Train's layout).
RUN_FILES = ("best.json", "result.json", "checkpoint_epoch*", "checkpoint_manager_snapshot.json")


class OwnershipError(Exception):
    """A directory mnist-dist will not replace; the message names it and the fix."""


def mark(directory: str | os.PathLike, kind: str) -> None:
    """Claim a directory being built (before its other files, so a half-written one is claimed too)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    (Path(directory) / MARKER).write_text(json.dumps({"made_by": "mnist-dist", "kind": kind}) + "\n")


def _is_run_directory(directory: Path) -> bool:
    return any(any(fnmatch.fnmatch(entry.name, pattern) for pattern in RUN_FILES) for entry in directory.iterdir())


def why_not_replaceable(target: Path, kind: str, protected: tuple[Path, ...] = ()) -> str | None:
    """None when `target` may be replaced by a new directory of `kind`; else the reason."""
    if target.is_symlink():
        return "is a symbolic link, which mnist-dist never replaces"
    if not target.exists():
        return None
    if not target.is_dir():
        return "exists and is not a directory"
    resolved = target.resolve()
    for path in protected:
        path = Path(path).resolve()
        if path == resolved or resolved in path.parents:
            return f"is or contains {path}, which this command reads"
    entries = list(target.iterdir())
    if not entries:
        return None  # nothing in it to lose
    if _is_run_directory(target):
        return "is a training run directory"
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("kind") != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        return f"holds files that mnist-dist {kind} did not write (no {MARKER} marker of {article} {kind})"
    foreign = [e.name for e in entries
               if e.name != MARKER and (not e.is_file() or e.is_symlink()
                                        or not any(fnmatch.fnmatch(e.name, p) for p in KINDS[kind]))]
    if foreign:
        return f"holds files that mnist-dist {kind} does not write ({', '.join(sorted(foreign)[:3])})"
    return None


def check_replaceable(target: str | os.PathLike, kind: str, protected: tuple[Path, ...] = (), fix: str = "") -> None:
    reason = why_not_replaceable(Path(target), kind, protected)
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


def remove_staging(directory: str | os.PathLike) -> None:
    """Remove a temporary directory this process created itself (never a user's path)."""
    shutil.rmtree(directory, ignore_errors=True)
