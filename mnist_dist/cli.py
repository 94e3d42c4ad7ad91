"""`mnist-dist`: a thin command line over the library. Heavy imports happen inside commands,
so `mnist-dist predict` works on an edge install without TensorFlow or Ray."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

STARTED = time.time()  # the command's start, near enough: this module is the first one it imports

from mnist_dist import training  # noqa: E402
from mnist_dist.config import MODELS, PRESETS  # noqa: E402
from mnist_dist.progress import Clock  # noqa: E402


# ---------------------------------------------------------------- data
def cmd_data(args: argparse.Namespace) -> int:
    from mnist_dist import data

    if args.action == "verify":
        for line in data.verify_dir(args.data_dir):
            print(line)
    elif args.action == "download":
        directory = data.resolve_dir(None, download=True)
        for line in data.verify_dir(directory):
            print(line)
    return 0


# ---------------------------------------------------------------- train
# Older names that still work: --allreduce also set the all-gather's dtype, so it was renamed.
ALIASES = {"--exchange-dtype": ("--allreduce",)}
TRAIN_OPTIONS = {
    # flag: (config field, type, help)
    "--model": ("model", str, " | ".join(MODELS)),
    "--epochs": ("epochs", int, "epochs to train"),
    "--batch-size": ("batch_size", int, "per-worker batch of the full group; global batch = batch-size x workers (MAX of a range)"),
    "--optimizer": ("optimizer", str, "sgd (momentum 0.9) | adam"),
    "--lr": ("learning_rate", float, "initial learning rate"),
    "--lr-decay": ("lr_decay", float, "learning-rate factor per epoch (staircase)"),
    "--l2": ("l2", float, "weight decay on dense layers, in the tutorial's units (default 5e-4)"),
    "--rotate": ("rotate", float, "with --augment: also rotate training images by up to this many degrees"),
    "--zoom": ("zoom", float, "with --augment: also scale training images by 1 +- this"),
    "--precision": ("precision", str, "fp32 | bf16 (mixed bfloat16, float32 logits; fast only on CPUs with AMX or AVX-512-BF16, and on GPUs)"),
    "--exchange-dtype": ("allreduce", str, "auto | fp32 | bf16: dtype the workers' gradients (and a big dense layer's gathered inputs and output gradients) travel and are summed in (auto: bf16 when --precision bf16 on CPUs); also --allreduce"),
    "--seed": ("seed", int, "shuffling and initialisation seed"),
    "--eval-every": ("eval_every", int, "steps between progress lines"),
    "--steps-per-execution": ("steps_per_execution", int, "train steps per tf.function call, as in Keras (default 10)"),
    "--teacher": ("teacher", str, "distil from this finished run's best checkpoint: its folder (STORAGE/NAME) or URI"),
    "--distill": ("distill", float, "with --teacher: weight of the teacher's softened logits; 1 - this on the labels (default 0.9)"),
    "--temperature": ("temperature", float, "with --teacher: softmax temperature of the distillation (default 4)"),
    "--data-dir": ("data_dir", str, "folder with the MNIST IDX files (else $MNIST_DATA_DIR, else the cache)"),
    "--val-size": ("val_size", int, "first N training images held out for validation (default 5000)"),
    "--train-limit": ("train_limit", int, "train on the first N remaining images only"),
    "--workers": ("workers", str, "Ray Train workers: N (default 2), or an elastic range MIN-MAX such as 1-4"),
    "--checkpoint-every": ("checkpoint_every", str, "a step checkpoint every N steps (500) or seconds (60s, the default); 0: epoch checkpoints only"),
    "--resize-interval": ("resize_interval", float, "seconds between Ray's checks whether an elastic group can grow (default 15)"),
    "--cpus-per-worker": ("cpus_per_worker", int, "CPUs per worker; also sizes its thread pools"),
    "--gpus-per-worker": ("gpus_per_worker", float, "GPUs per worker: whole GPUs all-reduce with NCCL; a fraction (0.5) shares a GPU, with RING"),
    "--address": ("address", str, "Ray cluster: auto | ray://host:10001 (default: embedded local Ray)"),
    "--storage": ("storage", str, "run storage: local path, NFS mount or s3:// / gs:// URI (default ./runs)"),
    "--name": ("name", str, "run name; re-use it to resume an interrupted run"),
    "--max-failures": ("max_failures", int, "worker-group restarts from the latest checkpoint (-1: unlimited)"),
    "--keep": ("keep_checkpoints", int, "checkpoints kept, best by validation accuracy (default 3)"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help=" | ".join(PRESETS) + " (options below override it)")
    for flag, (_field, kind, help_text) in TRAIN_OPTIONS.items():
        parser.add_argument(flag, *ALIASES.get(flag, ()), type=kind, default=None, help=help_text)
    parser.add_argument("--augment", action="store_true", default=None, help="shift training images by up to 2 px")
    parser.add_argument("--synthetic", action="store_true", default=None, help="fake learnable digits instead of MNIST")
    parser.add_argument("--no-pin-cpus", dest="pin_cpus", action="store_false", default=None,
                        help="leave worker threads to the OS scheduler (by default, CPU workers that fill a node each keep to their own CPUs)")
    parser.add_argument("--expose-ray", action="store_true", default=None,
                        help="let the embedded local Ray listen on every interface (default: 127.0.0.1 only; token auth guards it either way)")
    parser.add_argument("--dashboard", action="store_true", default=None,
                        help="also start Ray's dashboard (http://127.0.0.1:8265) with the embedded local Ray; costs start-up time and some throughput")
    parser.add_argument("--in-process", action="store_true",
                        help="one process, no Ray (the default strategy); checkpoints in --storage/--name")


def config_from_args(args: argparse.Namespace):
    from mnist_dist.config import parse_workers, preset

    overrides = {field: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, (field, _k, _h) in TRAIN_OPTIONS.items()}
    overrides.update(augment=args.augment, synthetic=args.synthetic, pin_cpus=args.pin_cpus, dashboard=args.dashboard,
                     expose_ray=args.expose_ray)
    if overrides["teacher"] is None and (given := [f for f in ("--distill", "--temperature") if getattr(args, f[2:]) is not None]):
        from mnist_dist.config import ConfigError
        raise ConfigError(f"{' and '.join(given)} shape distillation, which needs a teacher. Fix: add --teacher RUN "
                          "(a finished run), or leave them out")
    if overrides["workers"] is not None:
        overrides["min_workers"], overrides["workers"] = parse_workers(overrides["workers"])
    if args.in_process:
        overrides["workers"], overrides["min_workers"] = 1, None
    return preset(args.preset, **overrides)


def add_mlflow_arguments(parser: argparse.ArgumentParser, registers: bool = False) -> None:
    parser.add_argument("--mlflow", default=None, metavar="URI",
                        help="log to this MLflow tracking server (default: $MLFLOW_TRACKING_URI; docs/registry.md)")
    if registers:
        parser.add_argument("--mlflow-model", default="mnist", metavar="NAME",
                            help="the registered model a verified export becomes a version of (default mnist)")


def tracker(args: argparse.Namespace):
    """The MLflow tracker of --mlflow or $MLFLOW_TRACKING_URI, checked before any training; or None."""
    from mnist_dist import tracking

    uri = tracking.tracking_uri(getattr(args, "mlflow", None))
    return tracking.Tracker(uri, getattr(args, "mlflow_model", "mnist")) if uri else None


def cmd_train(args: argparse.Namespace) -> int:
    mlflow = tracker(args)
    result = training.run(config_from_args(args), in_process=args.in_process, clock=Clock(STARTED))
    if mlflow:
        from mnist_dist.store import Location

        mlflow.record(Location.of(result["run_dir"]))
    print(json.dumps({k: result[k] for k in ("best_epoch", "best_val_accuracy", "test_accuracy", "best_checkpoint")}))
    return 0


# ---------------------------------------------------------------- export / predict
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..18 (default 17)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| fp32 vs TensorFlow")
    parser.add_argument("--max-int8-drop", type=float, default=0.1, help="max int8 accuracy loss in percentage points")
    parser.add_argument("--calibration-images", type=int, default=1000, help="training images used to calibrate int8 (and int4)")
    parser.add_argument("--int4", action="store_true",
                        help="also model.int4.onnx: 4-bit weights, smaller than int8 and slower (export/README.md)")
    parser.add_argument("--max-int4-drop", type=float, default=0.2, help="with --int4: max int4 accuracy loss in percentage points (default 0.2)")
    parser.add_argument("--force", action="store_true", help="replace an existing verified export")


def export_options(args: argparse.Namespace):
    from mnist_dist.export import ExportOptions

    return ExportOptions(opset=args.opset, tolerance=args.tolerance, max_int8_drop_pp=args.max_int8_drop,
                         force=args.force, calibration_images=args.calibration_images, int4=args.int4,
                         max_int4_drop_pp=args.max_int4_drop)


def cmd_export(args: argparse.Namespace) -> int:
    from mnist_dist.export import export

    report = export(run=args.run, checkpoint=args.checkpoint, out=args.out, options=export_options(args))
    return 0 if report["verified"] else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """The edge runtime's predict, of an export anywhere the run store reaches: a bucket's is
    read from a local copy, so the edge runtime itself stays pyarrow-free."""
    import contextlib
    from pathlib import Path

    from mnist_edge.cli import run

    from mnist_dist.store import Location

    if args.model.startswith("models:/"):  # a registered version, from MLflow's registry
        import tempfile

        mlflow = tracker(args)
        if mlflow is None:
            from mnist_dist.config import ConfigError
            raise ConfigError(f"--model {args.model} is in an MLflow registry, and no server is named. "
                              "Fix: --mlflow URI, or set MLFLOW_TRACKING_URI")
        with tempfile.TemporaryDirectory() as scratch:
            return run(argparse.Namespace(**{**vars(args), "model": str(mlflow.fetch(args.model, Path(scratch)))}))
    model = Location.of(args.model)
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(model.local_copy())
        except FileNotFoundError:
            local = None
        if local is None or local == Path(model.uri):  # on this disk, or nowhere: the edge runtime names it as given
            return run(args)
        return run(argparse.Namespace(**{**vars(args), "model": str(local)}))


def cmd_pipeline(args: argparse.Namespace) -> int:
    from mnist_dist import pipeline

    config = config_from_args(args)
    if args.from_tune:  # the sweep's best trial, as it trained: nothing to train, then its export
        from mnist_dist import sweep

        config = sweep.best_config(config.storage, args.from_tune)
    mlflow = tracker(args)
    if mlflow:  # named now (a run without --name gets the time), so that the record finds it after
        from mnist_dist import rundir

        config = rundir.settle(config)
    report = pipeline.run(config, export_options(args), export_dir=args.export_dir,
                          in_process=args.in_process, clock=Clock(STARTED))
    if mlflow:
        from mnist_dist.store import Location

        run = rundir.run_dir(config)
        mlflow.record(run)
        mlflow.register(run, Location.of(args.export_dir) if args.export_dir else run / "export", report)
    return 0 if report["verified"] else 1


# ---------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    from mnist_dist import sweep
    from mnist_dist.config import ConfigError

    if args.in_process:
        raise ConfigError("tune runs its trials on Ray; --in-process does not apply. Fix: leave it out")
    base = config_from_args(args)
    names = {flag.lstrip("-"): field for flag, (field, _k, _h) in TRAIN_OPTIONS.items()} | {"augment": "augment"}
    kinds = {field: kind for _flag, (field, kind, _h) in TRAIN_OPTIONS.items()} | {"augment": bool}
    text = None
    if args.space_file:
        try:
            with open(args.space_file) as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"--space-file {args.space_file}: {exc.strerror}. Fix: the path of a YAML file of the space") from None
    for flag, value, least in (("--samples", args.samples, 1), ("--grace-epochs", args.grace_epochs, 1),
                               ("--max-concurrent", args.max_concurrent or 1, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.grace_epochs > base.epochs:
        raise ConfigError(f"--grace-epochs {args.grace_epochs} is more than --epochs {base.epochs}. Fix: at most --epochs")
    spec = sweep.Sweep(sweep.parse_space(args.space or [], text, names, kinds, base.validate()), samples=args.samples,
                       grace_epochs=args.grace_epochs, max_concurrent=args.max_concurrent)
    mlflow = tracker(args)
    if mlflow:  # named now (a sweep without --name gets the time), so that the record finds it after
        from mnist_dist import rundir

        base = rundir.settle(base)
    record = sweep.run(base, spec)
    if mlflow:
        from mnist_dist.store import Location

        mlflow.record_sweep(Location.of(base.storage) / base.name, record)
    return 0 if record.get("best") else 1


# ---------------------------------------------------------------- report / baseline
def cmd_report(args: argparse.Namespace) -> int:
    from mnist_dist.report import write_report

    write_report(args.run, out=args.out)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from mnist_dist import baselines
    from mnist_dist.config import TrainConfig
    from mnist_dist.store import Location

    config = TrainConfig(data_dir=args.data_dir, synthetic=args.synthetic, train_limit=args.train_limit,
                         val_size=args.val_size, batch_size=args.batch_size, epochs=args.epochs).validate()
    baselines.run(config, names=args.models, epochs=args.epochs, out=Location.of(args.out) if args.out else None,
                  run_dir=Location.of(args.run) if args.run else None)
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from mnist_dist.bench import check_json_path, peers

    check_json_path(args.json)  # before minutes of measuring
    if args.kind == "train":
        from mnist_dist.bench.train import run
        from mnist_dist.config import TrainConfig

        # The same checks and messages as `train`.
        TrainConfig(precision=args.precision, allreduce=args.allreduce).validate()
        peers.check(args.peer_python, TrainConfig(model=args.model))
        run(model=args.model, global_batch=args.global_batch, precision=args.precision, steps=args.steps,
            workers=tuple(args.workers), json_path=args.json, allreduce=args.allreduce, rounds=args.rounds,
            peer_python=args.peer_python)
    elif args.kind == "infer":
        from mnist_dist.bench.infer import run
        run(exports=args.export, runs=args.run, iterations=args.iterations, seconds=args.seconds, json_path=args.json,
            profile=args.profile)
    elif args.kind == "startup":
        from mnist_dist.bench.startup import run
        from mnist_dist.config import TrainConfig
        TrainConfig(workers=args.workers).validate()  # the same checks and messages as `train`
        peers.check(args.peer_python, TrainConfig())
        run(workers=args.workers, train_limit=args.train_limit, json_path=args.json, peer_python=args.peer_python)
    elif args.kind == "pipeline":
        from mnist_dist.bench.pipeline import run
        config = config_from_args(args)
        peers.check(args.peer_python, config)
        run(config, json_path=args.json, peer_python=args.peer_python, in_process=args.in_process)
    else:
        from mnist_dist.bench.tta import run
        config = config_from_args(args)
        peers.check(args.peer_python, config)
        run(config, target=args.target, json_path=args.json, in_process=args.in_process, peer_python=args.peer_python)
    return 0


def add_peer_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--peer-python", default=None, metavar="PYTHON",
                        help=f"the Python of a venv made from scripts/lock/bench-peer-*.txt: also run {what} "
                             "(docs/benchmarks.md#the-peers)")


def add_bench_parsers(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: train throughput, inference latency, start-up, time to accuracy, to an export")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    k = kinds.add_parser("train", help="img/s: plain Keras fit vs the project's step vs Ray with 1..N workers")
    k.add_argument("--model", default="tf-tutorial", choices=list(MODELS))
    k.add_argument("--global-batch", type=int, default=256)
    k.add_argument("--precision", default="fp32", help="fp32 | bf16 (mixed bfloat16)")
    k.add_argument("--exchange-dtype", "--allreduce", dest="allreduce", default="auto",
                   help="auto | fp32 | bf16: the dtype the Ray runs' gradients travel in")
    k.add_argument("--steps", type=int, default=100, help="global batches per epoch; the second of 2 epochs is timed")
    k.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to measure")
    k.add_argument("--rounds", type=int, default=1, help="measure every setup this many times, round-robin; report medians")
    add_peer_argument(k, "Ray's TensorflowTrainer example and TF_CONFIG with tf_keras")
    k.add_argument("--json", default=None, help="also write the figures here")
    k.set_defaults(func=cmd_bench)

    k = kinds.add_parser("infer", help="TensorFlow vs ONNX Runtime fp32/int8: batch-1 latency, batch-256 throughput")
    k.add_argument("--export", action="append", help="a verified export directory; repeat to compare several")
    k.add_argument("--run", action="append", help="a run directory with a verified RUN/export; repeat to compare several")
    k.add_argument("--iterations", type=int, default=2000, help="batch-1 runs per latency figure")
    k.add_argument("--seconds", type=float, default=2.0, help="how long each batch-256 throughput figure is measured")
    k.add_argument("--profile", action="store_true", help="also print ONNX Runtime's per-node times and the weight-read floor")
    k.add_argument("--json", default=None)
    k.set_defaults(func=cmd_bench)

    k = kinds.add_parser("startup", help="seconds outside training of `train --epochs 1`, against Ray Train's own floor")
    k.add_argument("--workers", type=int, default=2)
    k.add_argument("--train-limit", type=int, default=None, help="train on the first N images (default: all)")
    add_peer_argument(k, "Ray's TensorflowTrainer example with tf_keras, for one epoch")
    k.add_argument("--json", default=None)
    k.set_defaults(func=cmd_bench)

    k = kinds.add_parser("pipeline", help="wall seconds to a checked ONNX model: mnist-dist pipeline vs the peer's train-then-tf2onnx")
    add_train_arguments(k)
    add_peer_argument(k, "Ray's TensorflowTrainer example with tf_keras, then tf2onnx")
    k.add_argument("--json", default=None)
    k.set_defaults(func=cmd_bench)

    k = kinds.add_parser("tta", help="training seconds until the test accuracy first reaches --target")
    add_train_arguments(k)
    k.add_argument("--target", type=float, default=0.99, help="test accuracy to reach (default 0.99)")
    add_peer_argument(k, "Ray's TensorflowTrainer example with tf_keras, on the same recipe")
    k.add_argument("--json", default=None)
    k.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-dist", description="Distributed MNIST: train on Ray, export verified ONNX, run on the edge.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="verify or download the MNIST files")
    p.add_argument("action", choices=["verify", "download"])
    p.add_argument("--data-dir", default=None, help="folder to check (default: $MNIST_DATA_DIR, then the cache)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train on Ray Train workers (or --in-process)")
    add_train_arguments(p)
    add_mlflow_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="best checkpoint -> verified model.onnx + model.int8.onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (uses the best checkpoint by validation accuracy)")
    src.add_argument("--checkpoint", help="a checkpoint directory")
    p.add_argument("--out", default=None, help="export directory (default RUN/export)")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pipeline", help="train, then export (the Ray job / RayJob entrypoint)")
    add_train_arguments(p)
    p.add_argument("--from-tune", default=None, metavar="SWEEP",
                   help="export the best trial of the sweep --storage/SWEEP (mnist-dist tune) instead of training a run")
    p.add_argument("--export-dir", default=None, help="default RUN_DIR/export")
    add_export_arguments(p)
    add_mlflow_arguments(p, registers=True)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("tune", help="a Ray Tune sweep (ASHA) over train options, each trial a Ray Train run")
    add_train_arguments(p)
    p.add_argument("--space", action="append", metavar="KEY=VALUES",
                   help="an option to vary: lr=0.01,0.05 (each tried) or lr=loguniform:0.001:0.1 (sampled); repeat")
    p.add_argument("--space-file", default=None, metavar="YAML", help="the space as YAML: {lr: [0.01, 0.05], l2: {loguniform: [1e-5, 1e-3]}}")
    p.add_argument("--samples", type=int, default=1, help="Tune's num_samples: each point of the grid this many times")
    p.add_argument("--grace-epochs", type=int, default=1, help="ASHA ends no trial before this many epochs (default 1)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster's CPUs hold)")
    add_mlflow_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="plots, prediction grid, confusion matrix and report.md of a finished run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", default=None, help="output folder (default RUN/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baseline", help="logistic regression and MLP reference points on the same data split")
    p.add_argument("--run", default=None, help="write RUN/baselines.json, which `report` shows beside the CNN")
    p.add_argument("--out", default=None, help="write the results as JSON here instead")
    p.add_argument("--models", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp"])
    p.add_argument("--epochs", type=int, default=10, help="epochs per model (default 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--synthetic", action="store_true")
    p.set_defaults(func=cmd_baseline)

    add_bench_parsers(sub)

    from mnist_edge.cli import add_arguments
    p = add_arguments(sub.add_parser("predict", help="classify PNG/JPEG/.npy/IDX inputs with an exported model"))
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="the MLflow server of a --model models:/NAME/VERSION (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_predict)

    from mnist_dist import web_demo
    p = web_demo.add_arguments(sub.add_parser("serve-demo", help="serve the browser demo (export/web) of a verified export"))
    p.set_defaults(func=web_demo.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ INFO and WARNING lines, here and in every process this one starts.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        from mnist_edge.cli import reader_went_away
        return reader_went_away()
    except Exception as exc:
        from mnist_edge.errors import EdgeError

        from mnist_dist.errors import MnistDistError
        from mnist_dist.rundir import StorageFailedMidRun

        # The edge runtime's own error: mnist_edge installs without this package's code.
        if isinstance(exc, (MnistDistError, EdgeError)):
            print(f"error: {exc}", file=sys.stderr)
            if isinstance(exc, StorageFailedMidRun):
                # pyarrow's S3 finalizer waits for requests still in flight, to a store that may
                # not answer for minutes; Ray is stopped and nothing is left to write.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
