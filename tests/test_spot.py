"""The rules of mnist_dist.spot, in this process: what the workers agree to do at a call
boundary, and the record of worker groups. A session of this file's own stands in for Ray
Train's collectives; tests/test_cluster.py runs them on real Ray nodes."""
import time

import pytest

from mnist_dist import compat, spot
from mnist_dist.config import TrainConfig
from mnist_dist.store import Location


class Session:
    """One worker's view, as mnist_dist.sessions gives it; `deadline` and `room` are what Ray would say."""

    rank, world_size = 0, 2

    def __init__(self, deadline=None, room=False):
        self.deadline, self.room, self.collectives = deadline, room, 0

    def preemption_deadline(self):
        self.collectives += 1
        return self.deadline

    def agree(self, proposal):
        self.collectives += 1
        return proposal

    def can_place_another_worker(self):
        return self.room


def boundaries(watch, steps, call_seconds=0.0):
    decisions = []
    for step in steps:
        time.sleep(call_seconds)
        decisions.append(watch.at_boundary(step))
    return decisions


def test_fast_calls_are_checked_about_once_a_second_and_step_checkpoints_still_land_on_their_steps():
    session = Session()
    watch = spot.Watch(TrainConfig(checkpoint_every="50"), session, start_step=0)
    decisions = boundaries(watch, range(10, 210, 10), call_seconds=0.05)  # 20 calls of 50 ms: 1 s
    assert session.collectives <= 2 * 3  # the first check, then about one a second
    assert [step for step, d in zip(range(10, 210, 10), decisions) if d.checkpoint] == [50, 100, 150, 200]


def test_a_notice_checkpoints_at_once_trains_on_and_checkpoints_again_just_before_the_deadline(monkeypatch):
    monkeypatch.setattr(spot, "CHECK_EVERY_S", 0.2)  # a check every other call of 0.1 s
    monkeypatch.setenv(compat.RAY_TRAIN_POLL_ENV, "0.2")  # as on the embedded Ray (compat.LOCAL_RAY_TRAIN_ENV)
    session = Session()
    watch = spot.Watch(TrainConfig(checkpoint_every="0"), session, start_step=0)
    time.sleep(0.1)
    assert not watch.at_boundary(10).checkpoint
    session.deadline = time.time() + 2.5
    decisions, step = [], 10
    while time.time() < session.deadline + 1 and not (decisions and decisions[-1].stop == "preemption"):
        time.sleep(0.1)
        step += 10
        decisions.append(watch.at_boundary(step))
        if decisions[-1].checkpoint:
            watch.checkpointed(step, 0.01)
    taken = [d.stop for d in decisions if d.checkpoint]
    assert taken == ["notice", "preemption"], decisions  # at once, then once more before the deadline
    notice = next(i for i, d in enumerate(decisions) if d.checkpoint)
    assert notice <= 1 and len(decisions) - notice > 2  # told within a check; trained on through the notice
    assert decisions[-1].deadline >= session.deadline


@pytest.mark.parametrize("poll, trains_on", [(None, False), ("0.2", True)])
def test_the_last_checkpoint_leaves_ray_trains_controller_two_polls_to_take_it_in(monkeypatch, poll, trains_on):
    """Ray Train takes in a report at its controller's next poll (2 s by default) and stops the
    group at the deadline: a checkpoint reported later is lost, and its steps trained again."""
    monkeypatch.setattr(spot, "CHECK_EVERY_S", 0.0)
    if poll:
        monkeypatch.setenv(compat.RAY_TRAIN_POLL_ENV, poll)
    else:
        monkeypatch.delenv(compat.RAY_TRAIN_POLL_ENV, raising=False)
    watch = spot.Watch(TrainConfig(checkpoint_every="0"), Session(deadline=time.time() + 4.5), start_step=0)
    assert watch.at_boundary(10).stop == "notice"
    watch.checkpointed(10, 0.01)
    assert (watch.at_boundary(20).stop is None) is trains_on


def test_growth_is_proposed_only_for_an_elastic_group_below_its_max_with_room_for_a_worker():
    for config, room, grows in [(TrainConfig(workers=4, min_workers=1), True, True),
                                (TrainConfig(workers=4, min_workers=1), False, False),
                                (TrainConfig(workers=2), True, False),
                                (TrainConfig(workers=2, min_workers=1), True, False)]:  # already 2 of 2
        watch = spot.Watch(config.replace(checkpoint_every="0"), Session(room=room), start_step=0)
        decision = watch.at_boundary(10)
        assert (decision.stop == "grow") is grows, (config.worker_range, room)


@pytest.mark.parametrize("previous, restored, workers, expected", [
    (None, False, 2, ("start", 0)),
    ({"command": "c", "global_step": 130, "workers": 2, "stopping": "preemption", "lost_steps": 0}, True, 1, ("preemption", 0)),
    ({"command": "c", "global_step": 140, "workers": 1, "stopping": "grow", "lost_steps": 0}, True, 2, ("grow", 0)),
    ({"command": "c", "global_step": 170, "workers": 2, "stopping": None, "lost_steps": 3}, True, 2, ("failure", 23)),
    ({"command": "c", "global_step": 170, "workers": 1, "stopping": None, "lost_steps": 0}, True, 2, ("grow", 20)),
    ({"command": "other", "global_step": 170, "workers": 2, "stopping": None, "lost_steps": 0}, True, 2, ("start", 20)),
    ({"command": "c", "global_step": 40, "workers": 2, "stopping": None, "lost_steps": 0}, False, 2, ("failure", 40)),
])
def test_each_worker_group_is_recorded_with_why_it_started_and_the_steps_trained_twice(tmp_path, previous, restored,
                                                                                       workers, expected):
    run = Location.of(tmp_path)
    if previous:
        (run / spot.PROGRESS_FILE).write_json({"resizes": [{"global_step": 0, "workers": 2, "reason": "start"}], **previous})
    progress = spot.Progress(run, "c", workers)
    entry = progress.start(150 if restored else 0, restored)
    assert (entry["reason"], progress.record["lost_steps"]) == expected
    assert spot.read(run)["resizes"][-1] == entry  # written at once


def test_a_notice_waited_out_is_not_taken_again_though_ray_keeps_reporting_it(monkeypatch):
    monkeypatch.setattr(spot, "CHECK_EVERY_S", 0.0)  # a check at every call
    session = Session(deadline=time.time() - 1)  # a drain whose deadline passed: cancelled, or no restart came
    watch = spot.Watch(TrainConfig(checkpoint_every="0"), session, start_step=0)
    first = watch.at_boundary(10)
    assert first.stop == "notice"
    watch.checkpointed(10)
    last = watch.at_boundary(20)
    assert last.stop == "preemption"
    watch.resumed_without_restart(last)
    assert [watch.at_boundary(step).checkpoint for step in (30, 40, 50)] == [False, False, False]


def test_a_resize_that_does_not_come_makes_growth_wait_longer_each_time_and_a_failed_look_is_no_growth(monkeypatch):
    monkeypatch.setattr(spot, "CHECK_EVERY_S", 0.0)
    config = TrainConfig(workers=4, min_workers=1, checkpoint_every="0", resize_interval=1.0)
    watch = spot.Watch(config, Session(room=True), start_step=0)
    grow = watch.at_boundary(10)
    assert grow.stop == "grow"
    watch.resumed_without_restart(grow)
    first_pause = watch.quiet_until - time.monotonic()
    watch.quiet_until = 0.0
    watch.checked_capacity = 0.0
    watch.resumed_without_restart(watch.at_boundary(20))
    assert watch.quiet_until - time.monotonic() > 1.5 * first_pause

    class Broken(Session):
        def can_place_another_worker(self):
            raise ConnectionError("the GCS did not answer")

    assert spot.Watch(config, Broken(), start_step=0).at_boundary(10).stop is None


def test_progress_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, capsys):
    (tmp_path / "run").write_text("a file where the run's folder should be")
    progress = spot.Progress(Location.of(tmp_path / "run"), "c", 2)
    progress.start(0, False)
    progress.step(10, force=True)
    out = capsys.readouterr().out
    assert out.count("warning: cannot record the run's progress") == 1
