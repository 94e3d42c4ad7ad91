"""Spot-ready training: when the workers take a step checkpoint, and the record of each
interruption (docs/spot.md).

At every train-function call boundary the workers agree, with two small collectives, on
what to do next: go on, take a periodic step checkpoint, or take one and stop for a
preemption notice or for a larger group that Ray is about to start. A Ray resize restarts
the worker group from its latest checkpoint, so a checkpoint at the step where it happens
is what makes a resize cheap.

Rank 0 keeps `progress.json` in the run: how far the group got, and the group's history
(`resizes`, `lost_steps`), which result.json reports.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mnist_dist import compat
from mnist_dist.config import TrainConfig
from mnist_dist.store import Location, StorageError

PROGRESS_FILE = "progress.json"
CHECK_EVERY_S = 1.0  # how often the workers check for a notice, a periodic checkpoint or room to grow
PROGRESS_EVERY_S = 1.0  # how often rank 0 records its step: what a hard kill may leave unrecorded
# A group that stopped for a notice or a resize and was not torn down after this long past the
# deadline (a drain cancelled, no resize after all) trains on.
WAIT_MARGIN_S = 30.0
# Test hook: the least wall seconds a training step takes, so that a test's phases, which are
# timed in wall seconds (a notice, a node joining), hold about as many steps on any CPU.
STEP_FLOOR_ENV = "MNIST_DIST_STEP_FLOOR_S"


def step_floor() -> float:
    return float(os.environ.get(STEP_FLOOR_ENV) or 0.0)


def new_command_id() -> str:
    """Tells one command's worker groups from the next command's (a re-run of the same --name)."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Decision:
    checkpoint: bool = False
    # "preemption" or "grow": stop after the checkpoint until Ray restarts the group; "notice":
    # a preemption notice's first checkpoint, after which the group trains on.
    stop: str | None = None
    deadline: float | None = None  # when to give up waiting and train on (time.time())


class Watch:
    """Decides, identically on every worker, what to do at each call boundary.

    The two collectives run about once a second: rank 0 tells the others how many calls to
    skip until the next check, from how long its calls take. A preemption notice gets a
    checkpoint at once (the node may go before its deadline); the group then trains on
    through the notice and takes a last checkpoint when the time left is about what the
    calls between two checks and a checkpoint take, twice over, and waits for Ray Train,
    which stops the group at the deadline. Steps lost: none, unless the node goes early.
    """

    def __init__(self, config: TrainConfig, session, start_step: int):
        self.config, self.session = config, session
        self.every_steps, self.every_seconds = config.checkpoint_interval
        self.last_step, self.last_time = start_step, time.monotonic()
        self.quiet_until, self.misses = 0.0, 0  # after a resize that did not come, a longer pause each time
        self.checked_capacity = 0.0
        self.notice: float | None = None  # the preemption deadline (time.time()), once told
        self.handled: float | None = None  # a notice already waited out: Ray keeps reporting it
        self.epoch_end = 0.0  # how long the last epoch's end (evaluation, checkpoint) took
        self.skip = 0  # calls until the next check, as rank 0 last said
        self.calls_since, self.checked_at = 0, time.monotonic()
        self.between_checks, self.longest_checkpoint = 0.0, 0.0
        self.checks, self.check_seconds = 0, 0.0  # the collectives' count and cost, for the epoch's metrics
        self.last_check = 0.0

    def boundaries(self) -> int:
        """Steps that every call boundary aligns to, for step-counted checkpoints (0: none)."""
        return self.every_steps

    def at_boundary(self, step: int) -> Decision:
        self.last_check = 0.0
        periodic_steps = bool(self.every_steps and step % self.every_steps == 0)  # the same on every worker
        self.calls_since += 1
        if self.skip > 0:
            self.skip -= 1
            return Decision(checkpoint=periodic_steps)
        now = time.monotonic()
        try:
            decision = self._decide(step)
        finally:
            self.last_check = time.monotonic() - now
            self.checks += 1
            self.check_seconds += self.last_check
        return decision if decision.checkpoint else Decision(checkpoint=periodic_steps)

    def _decide(self, step: int) -> Decision:
        now = time.monotonic()
        self.between_checks = now - self.checked_at
        per_call = (now - self.checked_at) / self.calls_since
        self.calls_since, self.checked_at = 0, now
        if self.notice is None:
            deadline = self.session.preemption_deadline()  # collective
            if deadline is not None and deadline != self.handled:
                self.notice = deadline
                return Decision(checkpoint=True, stop="notice")
        proposal = self.rank0_proposal(per_call) if self.session.rank == 0 else {}
        agreed = self.session.agree(proposal)  # collective: rank 0's proposal
        self.skip = int(agreed.get("skip", 0))
        if agreed.get("last"):
            return Decision(checkpoint=True, stop="preemption", deadline=self.notice + WAIT_MARGIN_S)
        if agreed.get("grow"):
            return Decision(checkpoint=True, stop="grow", deadline=time.time() + self.config.resize_interval + WAIT_MARGIN_S)
        return Decision(checkpoint=bool(agreed.get("periodic")))

    def rank0_proposal(self, per_call: float) -> dict[str, Any]:
        now = time.monotonic()
        skip = max(0, round(CHECK_EVERY_S / max(per_call, 1e-3)) - 1)
        if self.notice is not None:
            # Twice what may come before the next check (calls, an epoch's end) and a checkpoint,
            # and two polls of Ray Train's controller, which takes in the report at its next poll.
            left = self.notice - time.time()
            margin = 2 * (self.between_checks + self.epoch_end + self.longest_checkpoint + compat.ray_train_poll_s()) + 1.0
            return {"last": left <= margin, "skip": skip}
        periodic = self.every_seconds and now - self.last_time >= self.every_seconds
        grow = False
        if self.config.elastic and now >= self.quiet_until and now - self.checked_capacity >= 1.0:
            self.checked_capacity = now
            try:
                grow = self.session.world_size < self.config.workers and self.session.can_place_another_worker()
            except Exception:  # noqa: BLE001  a failed look at the cluster is no reason to stop rank 0
                grow = False
        return {"periodic": bool(periodic), "grow": grow, "skip": skip}

    def cost(self) -> dict[str, float]:
        """The checks since the last call, for an epoch's metrics; then starts counting again."""
        cost = {"spot_checks": self.checks, "spot_check_seconds": self.check_seconds}
        self.checks, self.check_seconds = 0, 0.0
        return cost

    def checkpointed(self, step: int, seconds: float = 0.0) -> None:
        self.last_step, self.last_time = step, time.monotonic()
        self.longest_checkpoint = max(self.longest_checkpoint, seconds)
        self.checked_at, self.calls_since = self.last_time, 0  # a checkpoint is not calls' time

    def epoch_ended(self, step: int, seconds: float) -> None:
        """After an epoch's end and its checkpoint, which took `seconds`."""
        self.epoch_end = seconds
        self.checkpointed(step)

    def resumed_without_restart(self, decision: Decision) -> None:
        """The stop was not followed by a restart (a drain cancelled, a resize Ray did not
        make): the notice is over, and growth waits twice as long after each miss."""
        if decision.stop == "grow":
            self.misses += 1
            self.quiet_until = time.monotonic() + min(600.0, 2 ** self.misses * self.config.resize_interval)
        else:
            self.handled, self.notice = self.notice, None


class Progress:
    """Rank 0's record of the run across worker groups, in `progress.json`."""

    def __init__(self, run: Location, command_id: str, workers: int):
        self.location = run / PROGRESS_FILE
        self.command_id, self.workers = command_id, workers
        self.record: dict[str, Any] = {}
        self.written_at, self.warned = 0.0, False
        self.writer, self.pending = concurrent.futures.ThreadPoolExecutor(max_workers=1), None

    def start(self, restored_step: int, restored: bool) -> dict[str, Any]:
        """The entry this group adds to `resizes`, with the steps it must train again."""
        try:
            previous = self.location.read_json()
        except ValueError:  # cut off: a hard kill mid-write on a store without atomic puts
            previous = None
        if previous is None or (not restored and previous.get("command") != self.command_id):
            reason, resizes, lost = "start", [], 0  # a new run, or a new command over one without checkpoints
        else:
            resizes, lost = list(previous.get("resizes", [])), int(previous.get("lost_steps", 0))
            lost += max(0, int(previous.get("global_step", restored_step)) - restored_step)
            if previous.get("command") != self.command_id:
                reason = "start"  # a new command resumed the run
            elif previous.get("stopping") in ("preemption", "grow"):
                reason = previous["stopping"]
            else:
                reason = "grow" if self.workers > int(previous.get("workers", self.workers)) else "failure"
        entry = {"global_step": restored_step, "workers": self.workers, "reason": reason}
        self.record = {"command": self.command_id, "workers": self.workers, "global_step": restored_step,
                       "resizes": resizes + [entry], "lost_steps": lost, "stopping": None}
        self.write()
        return entry

    def step(self, global_step: int, stopping: str | None = None, force: bool = False) -> None:
        """Records the step: at once when `force` (a checkpoint, a stop), else at most once a
        second, in the background, so that a slow put into a bucket never holds up rank 0 (and,
        at the next all-reduce, every worker)."""
        self.record.update(global_step=global_step, stopping=stopping)
        if force:
            if self.pending is not None:
                self.pending.result()
            self.write(dict(self.record))
        elif time.monotonic() - self.written_at >= PROGRESS_EVERY_S and (self.pending is None or self.pending.done()):
            self.written_at = time.monotonic()
            self.pending = self.writer.submit(self.write, dict(self.record))

    def write(self, record: dict[str, Any] | None = None) -> None:
        """Best effort: a store that fails once must not stop rank 0 alone (the others would wait)."""
        self.written_at = time.monotonic()
        try:
            self.location.write_json(self.record if record is None else record)
        except (StorageError, OSError) as exc:
            if not self.warned:
                self.warned = True  # first: the background writer and a forced write may both fail
                # Not print(): in a Ray Train worker that echoes each line twice (process_setup.console).
                sys.stdout.write(f"warning: cannot record the run's progress in {self.location} ({exc}); training goes "
                                 "on, and result.json may count fewer steps trained twice\n")
                sys.stdout.flush()


def read(run: Location) -> dict[str, Any]:
    """`resizes` and `lost_steps` of a run, for result.json."""
    try:
        record = (run / PROGRESS_FILE).read_json() or {}
    except ValueError:
        record = {}
    return {"resizes": record.get("resizes", []), "lost_steps": record.get("lost_steps", 0)}
