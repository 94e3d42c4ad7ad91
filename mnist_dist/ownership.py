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
from pathlib import Path

from mnist_edge.runtime import FP32_FILE, INT4_FILE, INT8_FILE, ORT_FILES, REQUIRED_OPERATORS

from mnist_dist.errors import MnistDistError
from mnist_dist.store import Location

MARKER = ".mnist-dist.json"
MADE_BY = "made_by"  # the key that claims a single JSON output file (check_file_replaceable)
# What each kind of directory may hold, besides the marker.
KINDS = {
    "export": (FP32_FILE, INT8_FILE, *ORT_FILES.values(), INT4_FILE, REQUIRED_OPERATORS, "report.json", "report.md"),
    "checkpoint": ("model.keras", "state.json", "replica-*.json"),
    "report": ("report.md", "curves.png", "predictions.png", "confusion.png"),
}
# Any of these makes a folder a training run: the files of mnist_dist.rundir and results,
# and Ray Train's own (its checkpoints, snapshot and storage marker).
RUN_FILES = ("config.json", "result.json", "best.json", "progress.json", "checkpoint_*", "checkpoint_manager_snapshot.json",
             ".validate_storage_marker")


class OwnershipError(MnistDistError):
    """A directory mnist-dist will not replace; the message names it and the fix."""


def is_run(names: list[str]) -> bool:
    """Whether a folder holding `names` is a training run."""
    return any(fnmatch.fnmatch(name, pattern) for name in names for pattern in RUN_FILES)


def mark(directory: str | os.PathLike, kind: str) -> None:
    """Claim a local directory being built (before its other files, so a half-written one is claimed too)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    (Path(directory) / MARKER).write_text(json.dumps({"made_by": "mnist-dist", "kind": kind}) + "\n")


def _judge(entries: list[tuple[str, bool]], marker: str | bytes | None, kind: str) -> str | None:
    """The verdict on a folder's entries, (name, is a plain file), and its marker's text."""
    if not entries:
        return None  # nothing in it to lose
    if is_run([name for name, _ in entries]):
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


def why_not_replaceable(target: Location, kind: str, protected: tuple[Location, ...] = ()) -> str | None:
    """None when `target` (a folder or a bucket prefix) may be replaced by a new one of `kind`; else the reason."""
    if target.is_symlink():
        return "is a symbolic link, which mnist-dist never replaces"
    if not target.exists():
        return None
    if target.is_file():
        return "exists and is not a directory"
    for path in protected:
        if target.contains(path):
            return f"is or contains {path}, which this command reads"
    entries = target.entries()
    marker = (target / MARKER).read_bytes() if (MARKER, True) in entries else None
    return _judge(entries, marker, kind)


def check_replaceable(target: Location, kind: str, protected: tuple[Location, ...] = (), fix: str = "") -> None:
    reason = why_not_replaceable(target, kind, protected)
    if reason:
        raise OwnershipError(f"{target}: {reason}, so it is left as it is. Fix: {fix or 'choose another folder'}.")


def publish(staged: Path, target: Location, kind: str, commit: str, protected: tuple[Location, ...] = (),
            fix: str = "") -> None:
    """Put the folder `staged` (made by `target.staging()` and `mark`ed) at `target`, replacing
    only what `check_replaceable` allows, checked again here (Location.publish)."""
    check_replaceable(target, kind, protected, fix)
    target.publish(staged, commit=commit, first=MARKER)


def check_file_replaceable(path: Location, made_by: str, fix: str) -> None:
    """Refuse an output file that is in the way unless it is a JSON document `made_by` wrote."""
    if path.is_symlink():
        reason = "is a symbolic link, which mnist-dist never replaces"
    elif not path.exists():
        return
    elif not path.is_file():
        reason = "exists and is not a file"
    else:
        try:
            document = path.read_json()
        except ValueError:
            document = None
        if isinstance(document, dict) and document.get(MADE_BY) == made_by:
            return
        reason = f"is a file that `{made_by}` did not write (it has no \"{MADE_BY}\": \"{made_by}\")"
    raise OwnershipError(f"{path}: {reason}, so it is left as it is. Fix: {fix}.")
