"""`mnist-edge` / `mnist-dist predict`: classify digit images with an exported model."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from mnist_edge import inputs
from mnist_edge.errors import EdgeError
from mnist_edge.runtime import Classifier


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="export directory (uses model.onnx) or a .onnx or .ort file")
    parser.add_argument("--int8", action="store_true", help="with an export directory, use model.int8.onnx")
    parser.add_argument("--int4", action="store_true",
                        help="with an export directory, use model.int4.onnx (4-bit weights; made by `export --int4`)")
    parser.add_argument("--ort", action="store_true",
                        help="with an export directory, use the ONNX Runtime format: model.ort (model.int8.ort with --int8)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="PNG/JPEG images, .npy arrays or IDX image files")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.inputs:
        raise EdgeError("no inputs given. Fix: pass one or more PNG/JPEG, .npy or IDX files after the options.")
    classifier = Classifier(args.model, int8=args.int8, threads=args.threads, ort_format=args.ort, int4=args.int4)
    results = []
    for batch in batches((item for path in args.inputs for item in inputs.load(path)), BATCH):
        labels, probs = classifier.predict(np.stack([image for _, image in batch]))
        for (name, _), label, p in zip(batch, labels, probs):
            result = {"input": name, "label": int(label), "probability": round(float(p[label]), 6),
                      "probabilities": [round(float(x), 6) for x in p]}
            if args.json:
                results.append(result)
            else:
                print(f"{result['input']}: {result['label']} (p={result['probability']:.3f})")
    if args.json:
        print(json.dumps({"model": str(classifier.path), "predictions": results}, indent=2))
    return 0


# Images per ONNX Runtime call: the convolutions' activations grow with the batch (10,000
# images at once are about 1 GB of float32 for tf-tutorial's first layer alone).
BATCH = 256


def batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def reader_went_away() -> int:
    """The output's reader closed it (`predict ... | head`): stop quietly, as Unix tools do,
    and keep Python from reporting the unflushable stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="mnist-edge", description=__doc__))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return reader_went_away()


if __name__ == "__main__":
    sys.exit(main())
