"""Whether a Ray cluster can ever hold the worker group a run asks for.

A cluster without an autoscaler has the nodes it has: if they cannot place MIN workers of
--cpus-per-worker CPUs (and --gpus-per-worker GPUs) each, Ray Train would wait for them
until a deadline. The commonest cause is a KubeRay overlay that changed MNIST_WORKERS or
MNIST_CPUS_PER_WORKER but not the RayJob's worker group (a forgotten `transformers:`), so
the message names that fix too.
"""
from __future__ import annotations

import math

from mnist_dist.errors import RunError


def workers_that_fit(node_totals: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many workers the nodes can place: a worker's CPUs and GPUs are on one node."""
    fit = 0
    for total in node_totals:
        per_node = math.floor(total.get("CPU", 0) / cpus + 1e-9) if cpus else math.inf
        if gpus:
            per_node = min(per_node, math.floor(total.get("GPU", 0) / gpus + 1e-9))
        fit += 0 if per_node == math.inf else per_node
    return fit


def shortfall(node_totals: list[dict[str, float]], workers: int, cpus: float, gpus: float) -> str | None:
    """One line naming what is asked and what the cluster has, or None if it fits."""
    fit = workers_that_fit(node_totals, cpus, gpus)
    if fit >= workers:
        return None
    has_cpus = sum(t.get("CPU", 0) for t in node_totals)
    asked = f"{workers} workers x {cpus:g} CPUs = {workers * cpus:g} CPUs" + (f" and {workers * gpus:g} GPUs" if gpus else "")
    has = f"{has_cpus:g} CPUs" + (f" and {sum(t.get('GPU', 0) for t in node_totals):g} GPUs" if gpus else "")
    return (f"the Ray cluster can place {fit} of the {workers} workers asked for ({asked}); its nodes have {has} in all, "
            "and no autoscaler will add more. Fix: on KubeRay, end your overlay with `transformers: [../../wiring]` "
            "(k8s/README.md), so that the worker group gets MNIST_WORKERS and MNIST_CPUS_PER_WORKER; elsewhere, "
            "ask for fewer workers or CPUs (--workers, --cpus-per-worker), or add nodes.")


def check(node_totals: list[dict[str, float]], workers: int, cpus: float, gpus: float) -> None:
    problem = shortfall(node_totals, workers, cpus, gpus)
    if problem:
        raise RunError(problem)
