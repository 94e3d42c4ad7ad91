"""Where the training loop saves checkpoints and reports: Ray Train, or a plain folder.

The loop sees only a `Session`, so the same code runs in one process and on N Ray workers.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ContextManager, Protocol

from mnist_dist import checkpoint as ckpt
from mnist_dist import ownership
from mnist_dist.store import Location


class Session(Protocol):
    rank: int
    world_size: int
    run: Location  # where TensorBoard events go (rank 0)

    def latest_checkpoint(self) -> ContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None: ...


class DirectorySession:
    """One process, no Ray: checkpoints go to `RUN/checkpoint_epochNNN`, published whole (Location.publish)."""

    rank, world_size = 0, 1

    def __init__(self, run: Location):
        self.run = run
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """A local copy of the newest checkpoint that loads; one cut off mid-write is passed over."""
        names = sorted((name for name, is_file in self.run.entries()
                        if not is_file and fnmatch.fnmatch(name, "checkpoint_epoch*")), reverse=True)
        for name in names:
            with contextlib.ExitStack() as stack:
                try:
                    local = stack.enter_context((self.run / name).local_copy())
                    ckpt.load_state(local)
                except (ckpt.CheckpointError, OSError):  # cut off mid-write, or a link to nothing
                    continue
                yield local
                return
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None:
        target = self.run / f"checkpoint_epoch{epoch:03d}"
        with target.staging() as staged:
            for source in Path(checkpoint_dir).iterdir():
                with open(source, "rb") as src, open(staged / source.name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            # An earlier, unusable checkpoint of this epoch (cut off mid-write) is replaced only
            # when it is provably one of ours; state.json, which vouches for the model, goes last.
            ownership.publish(staged, target, "checkpoint", commit=ckpt.STATE_FILE,
                              fix=f"move {target} out of the run directory, then re-run the same command")
        self.reports.append({**metrics, "checkpoint": str(target)})


class RaySession:
    """The loop's view of Ray Train: rank, restore, and report-with-checkpoint."""

    def __init__(self, run: Location) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank, self.local_world_size = context.get_local_rank(), context.get_local_world_size()
        self.run = run

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:  # downloads when storage is remote
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None:
        import ray.train

        # Ray Train V2 keeps metrics only when they come with a checkpoint, and report()
        # is a barrier: every rank reports, each adding its files to the same folder.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=f"checkpoint_epoch{epoch:03d}")
