"""`mnist-dist bench`: figures measured side by side in one run, with the machine named.

- `bench train`: training img/s of plain Keras `fit` (the baseline), the project's step in
  one process, and the project through Ray with 1..N workers;
- `bench infer`: TensorFlow against ONNX Runtime fp32 and int8 (batch-1 latency,
  batch-256 throughput);
- `bench tta`: training seconds until the test accuracy first reaches a target;
- `bench startup`: the seconds `train --epochs 1` spends outside training, against a Ray
  Train run that does nothing;
- `bench pipeline`: the wall seconds of `mnist-dist pipeline`, start to verified export.

With `--peer-python`, each also runs what a user would run instead (mnist_dist.bench.peers).

Benchmarks print figures and ratios; tests run each once in its smallest form and never
assert on a timing.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from mnist_dist.machine import describe, summary_lines


def header(log: Callable[[str], None] = print) -> dict[str, Any]:
    machine = describe()
    for line in summary_lines(machine):
        log(line)
    return machine


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], log: Callable[[str], None] = print) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        log("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            log("  ".join("-" * w for w in widths))


MADE_BY = "mnist-dist bench"


def check_json_path(path: str | None) -> None:
    """Before any measuring: --json replaces only an earlier `bench --json` file."""
    from mnist_dist import ownership
    from mnist_dist.store import Location

    if path:
        ownership.check_file_replaceable(Location.of(path), MADE_BY, "choose another --json file")


def save(path: str | None, payload: dict[str, Any], log: Callable[[str], None] = print) -> None:
    from mnist_dist import ownership
    from mnist_dist.store import Location

    if path:
        check_json_path(path)
        Location.of(path).write_json({ownership.MADE_BY: MADE_BY, **payload})
        log(f"wrote {path}")
