"""Where the training loop saves checkpoints and reports: Ray Train, or a plain folder.

The loop sees only a `Session`, so the same code runs in one process and on N Ray workers.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ContextManager, Protocol

from mnist_dist import checkpoint as ckpt
from mnist_dist import ownership


class Session(Protocol):
    rank: int
    world_size: int
    run_dir: str  # where TensorBoard events go (rank 0)

    def latest_checkpoint(self) -> ContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None: ...


class DirectorySession:
    """One process, no Ray: checkpoints go to `run_dir/checkpoint_epochNNN` by rename."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: str | Path):
        self.run_dir = str(run_dir)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        valid = []
        for path in sorted(Path(self.run_dir).glob("checkpoint_epoch*")):
            with contextlib.suppress(ckpt.CheckpointError):
                ckpt.load_state(path)
                valid.append(path)
        yield valid[-1] if valid else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, epoch: int) -> None:
        target = Path(self.run_dir) / f"checkpoint_epoch{epoch:03d}"
        # Staged beside its destination, so the last step is a rename on one filesystem, even
        # when the temporary directory is on another (tmpfs, or the run on NFS).
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.run_dir))
        try:
            for source in Path(checkpoint_dir).iterdir():
                with open(source, "rb") as src, open(staged / source.name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            # An earlier, unusable checkpoint of this epoch (cut off mid-write) is replaced only
            # when it is provably one of ours.
            ownership.replace(staged, target, "checkpoint",
                              fix=f"move {target} out of the run directory, then re-run the same command")
        finally:
            ownership.remove_staging(staged)
        self.reports.append({**metrics, "checkpoint": str(target)})


class RaySession:
    """The loop's view of Ray Train: rank, restore, and report-with-checkpoint."""

    def __init__(self, run_dir: str) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank, self.local_world_size = context.get_local_rank(), context.get_local_world_size()
        self.run_dir = run_dir

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
