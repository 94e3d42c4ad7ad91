"""`mnist-dist bench tta`: time to accuracy.

Trains with a training configuration (by default the `default` preset: 2 Ray workers) and
scores the *current* weights on the test set at every eval interval and epoch end. The
figure is the training wall-clock time (evaluation excluded, tracing of the first step
included) at which test accuracy first reaches the target. Test scores are recorded only;
they choose nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mnist_dist.bench import header, save, table


def first_reaching(probes: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((p for p in probes if p["test_accuracy"] >= target), None)


def report(who: str, probes: list[dict[str, Any]], steps_per_epoch: float, target: float, epochs: int,
           log: Callable[[str], None]) -> dict[str, Any] | None:
    """Prints the probes and the first one at or over `target`; returns that one."""
    table(["step", "epoch", "training s", "test accuracy"],
          [[p["step"], f"{p['step'] / steps_per_epoch:.2f}", f"{p['train_seconds']:.1f}", f"{100 * p['test_accuracy']:.2f}%"]
           for p in probes], log)
    hit = first_reaching(probes, target)
    if hit:
        log(f"{who}: time to {100 * target:.1f}% test accuracy: {hit['train_seconds']:.1f} s of training "
            f"(step {hit['step']}, epoch {hit['step'] / steps_per_epoch:.2f})")
    else:
        log(f"{who}: did not reach {100 * target:.1f}% in {epochs} epochs "
            f"(best probe {100 * max(p['test_accuracy'] for p in probes):.2f}%)")
    return hit


def run(config, target: float = 0.99, json_path: str | None = None, in_process: bool = False,
        peer_python: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from mnist_dist import training

    machine = header(log)
    config = config.replace(probe_test=True).validate()
    where = "in this process" if in_process else f"{config.workers} Ray worker(s)"
    log(f"{config.model}, {where} x batch {config.batch_size}, lr {config.learning_rate}, "
        f"precision {config.precision}, up to {config.epochs} epochs; test accuracy every {config.eval_every} steps")
    started = time.perf_counter()
    result = training.run(config, in_process=in_process)
    wall = time.perf_counter() - started
    probes = [p for epoch in result["history"] for p in epoch.get("test_probes", [])]
    steps_per_epoch = result["global_step"] / result["epochs_completed"]
    hit = report("mnist-dist", probes, steps_per_epoch, target, config.epochs, log)
    log(f"wall {wall:.1f} s for the whole command, training {result['train_seconds']:.1f} s: "
        f"start-up, evaluation and checkpoint overhead {wall - result['train_seconds']:.1f} s")
    payload = {"benchmark": "tta", "machine": machine, "target": target, "config": config.to_dict(), "in_process": in_process,
               "seconds_to_target": hit["train_seconds"] if hit else None, "reached_at": hit, "probes": probes,
               "wall_seconds": wall, "train_seconds": result["train_seconds"],
               "final_test_accuracy": result["test_accuracy"]}
    if peer_python:
        from mnist_dist.bench import peers

        # In one process against the peer without Ray (TF_CONFIG), as `--in-process` trains without it.
        mode = "tf-config" if in_process else "ray"
        who = f"{peers.MODES[mode]}, {config.workers} worker(s)"
        log(f"{who}, the same recipe ...")
        peer = peers.measure(peer_python, mode, config, epochs=config.epochs, probe_every=config.eval_every)
        peer_hit = report(who, peer["probes"], peer["steps"], target, config.epochs, log)
        log(f"{who}: wall {peer['wall_seconds']:.1f} s, training {peer['train_seconds']:.1f} s")
        if hit and peer_hit:
            log(f"mnist-dist against the peer: {peer_hit['train_seconds'] / hit['train_seconds']:.2f}x as fast to "
                f"{100 * target:.1f}%")
        payload["peer"] = {**peer, "seconds_to_target": peer_hit["train_seconds"] if peer_hit else None, "reached_at": peer_hit}
    save(json_path, payload, log)
    return payload
