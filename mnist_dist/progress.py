"""Progress of long work, readable on a terminal and in logs.

On a terminal one line updates in place; anywhere else (Ray-forwarded logs, CI, files)
a plain line is printed at each quarter, so logs do not fill with carriage returns.
A run's start-up phases each get a line with the seconds since the command started (`Clock`).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], total: int, label: str, unit: str = "",
          log: Callable[[str], None] | None = None, stream=None) -> Iterator[T]:
    """Yield `items`; report how many of `total` are done (each item counts as its `len`, or 1)."""
    stream = stream or sys.stdout
    live = log is None and stream.isatty()
    emit = log or (lambda line: print(line, file=stream, flush=True))
    done, next_quarter, started = 0, 1, time.perf_counter()
    for item in items:
        yield item
        done += len(item) if hasattr(item, "__len__") else 1
        seconds = time.perf_counter() - started
        line = f"{label}: {done:,}/{total:,}{unit} ({seconds:.1f} s)"
        if live:
            print("\r" + line, end="" if done < total else "\n", file=stream, flush=True)
        elif done >= total * next_quarter / 4:
            emit(line)
            while done >= total * next_quarter / 4:
                next_quarter += 1


class Clock:
    """Seconds since a command started, for the line each start-up phase gets as it begins.

    Wall time, not a monotonic clock: a Ray worker, maybe on another node, is handed the start.
    """

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started

    def line(self, text: str) -> str:
        return f"[{time.time() - self.started:5.1f} s] {text}"
