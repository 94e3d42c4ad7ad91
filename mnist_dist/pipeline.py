"""`mnist-dist pipeline`: train, then export the best checkpoint, as one writer of the run.

This is what `ray job submit` and the RayJob run. Run again (a retried Ray job, a re-applied
RayJob) it finishes what is left: nothing when the verified export is of the best
checkpoint; a new export when the run has trained on since.
"""
from __future__ import annotations

from typing import Any

from mnist_dist import rundir, training
from mnist_dist.config import TrainConfig
from mnist_dist.export import ExportOptions, export, published
from mnist_dist.progress import Clock
from mnist_dist.store import Location, Where, basename


def run(config: TrainConfig, options: ExportOptions = ExportOptions(), export_dir: Where | None = None,
        in_process: bool = False, log=print, clock: Clock | None = None) -> dict[str, Any]:
    """Returns the export's report (its "verified" says whether it was published)."""
    options.validate()  # before minutes of training
    config = rundir.settle(config)
    run = rundir.run_dir(config)
    with rundir.locked(run, "pipeline"):  # one writer from training to the export
        result = training.run(config, in_process=in_process, log=log, clock=clock)
        out = Location.of(export_dir) if export_dir is not None else run / "export"
        previous = published(out)
        best = basename(result["best_checkpoint"])
        if previous is not None and basename(previous["checkpoint"]) == best and ("int4" in previous or not options.int4):
            log(f"verified export of {best} already in {out}: nothing to export")
            return previous
        # An export of an earlier best checkpoint (the run has trained on since), or one without
        # the int4 file now asked for, is replaced.
        options = ExportOptions(**{**options.__dict__, "force": options.force or previous is not None})
        return export(run=run, out=out, options=options, log=log)
