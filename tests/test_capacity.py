"""The rule that fails a run at once on a cluster that can never place its workers
(mnist_dist.capacity); tests/test_rayjob.py runs it on a RayJob with a forgotten wiring."""
from mnist_dist import capacity

HEAD = {"CPU": 0.0, "memory": 4e9}  # KubeRay's head: num-cpus 0


def node(cpus, gpus=0.0):
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def test_workers_fit_node_by_node_never_across_nodes():
    assert capacity.workers_that_fit([HEAD, node(2), node(2)], cpus=2, gpus=0) == 2
    assert capacity.workers_that_fit([HEAD, node(3), node(3)], cpus=2, gpus=0) == 2  # 6 CPUs, but 1 worker a node
    assert capacity.workers_that_fit([HEAD, node(4, 1), node(4, 2)], cpus=2, gpus=1) == 3
    assert capacity.workers_that_fit([node(8, 0.5)], cpus=1, gpus=0.25) == 2  # fractional GPUs


def test_a_forgotten_wiring_is_one_line_naming_both_numbers_and_the_fix():
    # The RayJob kept 2 workers of 2 CPUs; the settings ask for 4 of 2.
    problem = capacity.shortfall([HEAD, node(2), node(2)], workers=4, cpus=2, gpus=0)
    assert "\n" not in problem
    assert "place 2 of the 4 workers asked for (4 workers x 2 CPUs = 8 CPUs); its nodes have 4 CPUs in all" in problem
    assert "transformers: [../../wiring]" in problem
    assert capacity.shortfall([HEAD, node(2), node(2)], workers=2, cpus=2, gpus=0) is None
    gpus = capacity.shortfall([HEAD, node(4, 1)], workers=2, cpus=2, gpus=1)
    assert "= 4 CPUs and 2 GPUs" in gpus and "4 CPUs and 1 GPUs in all" in gpus


def test_the_waiting_line_names_what_each_worker_needs_and_what_is_free():
    from mnist_dist import placement

    assert placement.fits(2, {"CPU": 1}, {"CPU": 2.0}) and not placement.fits(2, {"CPU": 1}, {"CPU": 1.0})
    assert not placement.fits(2, {"CPU": 1, "GPU": 0.5}, {"CPU": 8.0, "GPU": 0.5})
    line = placement.waiting_line(2, {"CPU": 1, "GPU": 0.5}, {"CPU": 3.0}, {"CPU": 4.0, "GPU": 1.0})
    assert line.startswith("waiting for 2 worker(s) x 1 CPU + 0.5 GPU; the cluster has 3 of 4 CPU free, 0 of 1 GPU free")
    assert "\n" not in line and "--workers" in line


def test_the_clock_counts_from_the_start_it_is_given():
    import time

    from mnist_dist.progress import Clock

    import re

    assert re.fullmatch(r"\[ 12\.\d s\] loading MNIST \.\.\.", Clock(time.time() - 12.3).line("loading MNIST ..."))


def test_nodes_get_30_s_to_join_or_the_seconds_set_and_a_bad_setting_is_one_line(monkeypatch):
    import pytest

    from mnist_dist import launcher
    from mnist_dist.errors import RunError

    monkeypatch.delenv(launcher.JOIN_WAIT_ENV, raising=False)
    assert launcher.join_wait_seconds() == 30
    monkeypatch.setenv(launcher.JOIN_WAIT_ENV, "90")
    assert launcher.join_wait_seconds() == 90
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(launcher.JOIN_WAIT_ENV, bad)
        with pytest.raises(RunError, match=rf"^MNIST_DIST_JOIN_WAIT_S='{bad}' is not a number of seconds\. Fix: "):
            launcher.join_wait_seconds()
