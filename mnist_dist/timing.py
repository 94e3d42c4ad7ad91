"""Latency and throughput measurement shared by `export` and `bench`."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def latency_us(run: Callable[[], object], iterations: int = 1000, warmup: int = 100) -> dict[str, float]:
    for _ in range(warmup):
        run()
    samples = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        run()
        samples[i] = time.perf_counter() - start
    return {"p50": float(np.median(samples) * 1e6), "p99": float(np.percentile(samples, 99) * 1e6)}


def throughput(run: Callable[[], object], batch: int, seconds: float = 1.0, warmup: int = 3) -> float:
    """Images per second of `run` over about `seconds`, after warm-up."""
    for _ in range(warmup):
        run()
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * batch / elapsed


def ort_session(path, threads: int = 1):
    """The session a device gets from the edge runtime, so verification times what ships."""
    from mnist_edge.runtime import open_session

    return open_session(path, threads)
