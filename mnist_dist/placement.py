"""Say what a run is waiting for while Ray places its workers.

Ray Train asks for the worker group as one placement group and waits, silently, until the
cluster can hold it. From the driver, this watches for that placement group (the first one
made after the run asked) and, when it is not placed within a few seconds and the cluster has
not the room, says how many workers of what size wait and what the cluster has free.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from mnist_dist.progress import Clock

NOTE_AFTER_S = 5.0  # placing a group on a cluster with room takes well under this
NOTE_EVERY_S = 30.0


def describe(resources: dict[str, float]) -> str:
    """{"CPU": 1, "GPU": 0.5} -> "1 CPU + 0.5 GPU"."""
    return " + ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount)


def waiting_line(workers: int, per_worker: dict[str, float], free: dict[str, float], total: dict[str, float]) -> str:
    """What the run waits for and what the cluster has free, for each kind of resource a worker needs."""
    have = ", ".join(f"{free.get(name, 0):g} of {total.get(name, 0):g} {name} free"
                     for name, amount in per_worker.items() if amount)
    return (f"waiting for {workers} worker(s) x {describe(per_worker)}; the cluster has {have or 'nothing free'} "
            "(Ray Train starts them when there is room: free some, add nodes, or ask for fewer with --workers)")


def fits(workers: int, per_worker: dict[str, float], free: dict[str, float]) -> bool:
    """Whether the free resources, summed over the cluster, hold the workers (a lower bound of
    what placing them needs: a worker cannot span two nodes)."""
    return all(free.get(name, 0) >= workers * amount for name, amount in per_worker.items() if amount)


class PlacementWatch:
    """A context manager around `trainer.fit()`: a driver thread that says, every NOTE_EVERY_S,
    what the run is waiting for while its worker group is not placed."""

    def __init__(self, workers: int, per_worker: dict[str, float], log: Callable[[str], None], clock: Clock,
                 note_after: float = NOTE_AFTER_S, note_every: float = NOTE_EVERY_S):
        self.workers, self.per_worker, self.log, self.clock = workers, per_worker, log, clock
        self.note_after, self.note_every = note_after, note_every
        self.stopped = threading.Event()
        self.notes = 0

    def __enter__(self) -> PlacementWatch:
        from ray.util import placement_group_table

        self.thread = None
        try:
            self.before = set(placement_group_table())
        except Exception:  # noqa: BLE001 - a connection that cannot list them (Ray Client): no notes
            return self
        self.thread = threading.Thread(target=self._watch, name="mnist-dist-placement-watch", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stopped.set()
        if self.thread:
            self.thread.join(timeout=5)

    def new_groups(self) -> set[str]:
        """The states of the placement groups made since the run asked (on a shared cluster,
        another job's new group may end the watch early: these are progress lines only)."""
        from ray.util import placement_group_table

        return {group["state"] for group_id, group in placement_group_table().items() if group_id not in self.before}

    def _watch(self) -> None:
        import ray

        wait = self.note_after
        while not self.stopped.wait(wait):
            wait = 1.0
            try:
                if "CREATED" in self.new_groups():
                    return
                free = ray.available_resources()
                line = waiting_line(self.workers, self.per_worker, free, ray.cluster_resources())
                # Only a group that Ray cannot place (PENDING, with no room: not still starting,
                # not PREPARED with its resources already held) is waiting.
                if "PENDING" not in self.new_groups() or fits(self.workers, self.per_worker, free):
                    continue
            except Exception:  # noqa: BLE001 - a progress line must never fail a run
                return
            self.log(self.clock.line(line))
            self.notes += 1
            wait = self.note_every
