"""Where the training loop saves checkpoints and reports: Ray Train, or a plain folder.

The loop sees only a `Session`, so the same code runs in one process and on N Ray workers.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ContextManager, Protocol

from mnist_dist import checkpoint as ckpt
from mnist_dist import ownership
from mnist_dist.store import Location


class Session(Protocol):
    rank: int
    world_size: int
    run: Location  # where TensorBoard events and progress.json go (rank 0)
    command_id: str  # one per command: tells a re-run's worker groups from a restart's

    def latest_checkpoint(self) -> ContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, name: str) -> None: ...

    def preemption_deadline(self) -> float | None:
        """When a node of the group will be reclaimed (time.time()), or None; collective."""

    def agree(self, proposal: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's proposal, on every worker; collective."""

    def can_place_another_worker(self) -> bool: ...


def step_checkpoint_name(global_step: int) -> str:
    return f"checkpoint_step{global_step:08d}"


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:03d}"


class DirectorySession:
    """One process, no Ray: checkpoints go to `RUN/checkpoint_epochNNN`, published whole (Location.publish)."""

    rank, world_size = 0, 1

    def __init__(self, run: Location, command_id: str = ""):
        from mnist_dist.spot import new_command_id

        self.run, self.command_id = run, command_id or new_command_id()
        self.reports: list[dict[str, Any]] = []

    def preemption_deadline(self) -> float | None:
        return None  # one process, no Ray: nothing tells it of a reclaim

    def agree(self, proposal: dict[str, Any]) -> dict[str, Any]:
        return proposal

    def can_place_another_worker(self) -> bool:
        return False

    def _checkpoints(self) -> list[tuple[int, str]]:
        """(global step, name) of each checkpoint that loads, newest first; one cut off mid-write is passed over."""
        found = []
        for name, is_file in self.run.entries():
            if is_file or not fnmatch.fnmatch(name, "checkpoint_*"):
                continue
            try:
                found.append((int((self.run / name / ckpt.STATE_FILE).read_json()["global_step"]), name))
            except (ValueError, KeyError, TypeError, OSError):
                continue
        return sorted(found, reverse=True)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """A local copy of the newest checkpoint (by global step) that loads."""
        for _, name in self._checkpoints():
            with contextlib.ExitStack() as stack:
                try:
                    local = stack.enter_context((self.run / name).local_copy())
                    ckpt.load_state(local)
                except (ckpt.CheckpointError, OSError):  # cut off mid-write, or a link to nothing
                    continue
                yield local
                return
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, name: str) -> None:
        target = self.run / name
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
        # One step checkpoint at most, the newest: any other (a newer epoch's, or one cut off mid-write) goes.
        for older, is_file in self.run.entries():
            if not is_file and older != name and older.startswith("checkpoint_step"):
                (self.run / older).delete_tree(commit=ckpt.STATE_FILE)


class RaySession:
    """The loop's view of Ray Train: rank, restore, and report-with-checkpoint."""

    def __init__(self, run: Location, command_id: str, resources_per_worker: dict[str, float]) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank, self.local_world_size = context.get_local_rank(), context.get_local_world_size()
        self.run, self.command_id, self.resources_per_worker = run, command_id, resources_per_worker

    def preemption_deadline(self) -> float | None:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return None
        from mnist_dist import compat

        if info.deadline_ms:
            return info.deadline_ms / 1000
        # Ray Train counts its default from when it saw the drain, up to a poll before this worker did.
        return time.time() + compat.RAY_PREEMPTION_DEFAULT_DEADLINE_S - compat.RAY_PREEMPTION_POLL_S

    def agree(self, proposal: dict[str, Any]) -> dict[str, Any]:
        import ray.train.collective

        return ray.train.collective.broadcast_from_rank_zero(proposal)

    def can_place_another_worker(self) -> bool:
        """Whether one node, not draining, has room for one more worker: a node joined (rank 0 only)."""
        from mnist_dist import compat

        wanted = {name: amount for name, amount in self.resources_per_worker.items() if amount}
        return any(all(free.get(name, 0.0) >= amount for name, amount in wanted.items())
                   for free in compat.free_resources_per_node().values())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:  # downloads when storage is remote
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path, name: str) -> None:
        import ray.train

        # Ray Train V2 keeps metrics only when they come with a checkpoint, and report()
        # is a barrier: every rank reports, each adding its files to the same folder.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=name)
