"""`mnist-dist export`: best checkpoint -> verified fp32 and int8 ONNX models + report.

Everything is written into a temporary sibling directory; only when every verification
rule passes is it renamed to the output directory. A failed export is moved to
`<out>.rejected` (report.json says `"verified": false`) and the command exits non-zero.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from mnist_edge.runtime import (
    FP32_FILE,
    INT4_FILE,
    INT8_FILE,
    META_LABELS,
    META_NORMALIZATION,
    META_SESSION,
    ORT_FILES,
    REQUIRED_OPERATORS,
)

from mnist_dist import machine, onnx_graph, ownership
from mnist_dist.checkpoint import CheckpointError, file_sha256, load_model_at, write_json_atomic
from mnist_dist.data import PIXEL_OFFSET, PIXEL_SCALE
from mnist_dist.errors import MnistDistError, RunError
from mnist_dist.store import Location, StorageError, Where

REPORT_JSON, REPORT_MD = "report.json", "report.md"
# What the int8 model asks of ONNX Runtime (see quantize_int8).
INT8_SESSION = {"disabled_optimizers": ["QDQPropagationTransformer"]}
# ONNX Runtime 1.31 has no int4 kernels: it dequantizes int4 weights on every call unless
# told to fold them into float weights once, at load (docs/benchmarks.md has both speeds).
INT4_SESSION = {**INT8_SESSION, "config": {"session.disable_quant_qdq": "1"}}
INT4_OPSET = 21  # the first with 4-bit DequantizeLinear in the standard domain
SCHEMA_VERSION = 1


class ExportError(MnistDistError):
    """An export that cannot be made or was refused; the message says which rule and why."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How an export is made and the rules it must pass (`mnist-dist export` flags)."""

    opset: int = 17
    tolerance: float = 1e-4  # max |logit difference| fp32 vs TensorFlow
    max_int8_drop_pp: float = 0.1  # max int8 accuracy loss, percentage points
    calibration_images: int = 1000  # training images that calibrate int8 (and int4)
    int4: bool = False  # also a third file with 4-bit weights
    # 4-bit weights lose a little more than int8's; an opt-in file must not reject an export
    # whose int8 file passes by a margin of a few images (docs/benchmarks.md has the drops).
    max_int4_drop_pp: float = 0.2  # max int4 accuracy loss, percentage points
    force: bool = False  # replace an existing verified export

    def validate(self) -> ExportOptions:
        """Every threshold is checked before anything is loaded: a rule that cannot fail verifies nothing."""
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ExportError(f"--tolerance must be a finite number >= 0, got {self.tolerance}. "
                              "Fix: pass e.g. --tolerance 1e-4 (the default).")
        defaults = ExportOptions()
        for flag, value, default in (("--max-int8-drop", self.max_int8_drop_pp, defaults.max_int8_drop_pp),
                                     ("--max-int4-drop", self.max_int4_drop_pp, defaults.max_int4_drop_pp)):
            if not (math.isfinite(value) and 0 <= value <= 100):
                raise ExportError(f"{flag} must be a finite number of percentage points in [0, 100], got "
                                  f"{value}. Fix: pass e.g. {flag} {default:g} (the default).")
        if self.calibration_images < 1:
            raise ExportError(f"--calibration-images must be >= 1, got {self.calibration_images}. "
                              "Fix: pass e.g. --calibration-images 1000 (the default).")
        if not onnx_graph.MIN_OPSET <= self.opset <= onnx_graph.MAX_OPSET:
            raise ExportError(f"opset {self.opset} is not supported: tf2onnx 1.17 is tested with opsets "
                              f"{onnx_graph.MIN_OPSET}..{onnx_graph.MAX_OPSET}. Fix: pass --opset 17 (the default) or "
                              "another in that range.")
        return self


def resolve_checkpoint(run: Location | None, checkpoint: Location | None) -> tuple[Location, Location | None]:
    """(the checkpoint, and the run it belongs to)."""
    from mnist_dist.results import best_checkpoint

    if checkpoint is not None:
        return checkpoint, None
    try:
        path, _best = best_checkpoint(run)
    except RunError as exc:
        raise ExportError(str(exc)) from None
    return path, run


def checkpoint_name(checkpoint: Location, run: Location | None) -> str:
    """The checkpoint relative to its run (`checkpoint_epoch002`), or where it is, outside one."""
    return checkpoint.name if run is not None and checkpoint.parent == run else str(checkpoint)


def report_checkpoint(report: dict[str, Any], export_dir: Path) -> Path:
    """The checkpoint an export was made from. A name relative to its run is looked up in
    the run around the export (RUN/export) first, then where the run was when exported."""
    named = Path(report["checkpoint"])
    if named.is_absolute():
        return named
    for run in (export_dir.resolve().parent, Path(report.get("run") or ".")):
        if (run / named).is_dir():
            return run / named
    raise ExportError(f"{export_dir}: its checkpoint {named} is neither in {export_dir.resolve().parent} nor in "
                      f"{report.get('run')}. Fix: pass the run's export, RUN/export, or --run RUN.")


def read_report(out: Location) -> dict[str, Any] | None:
    """The export's report.json, or None when it has none that can be read."""
    try:
        report = (out / REPORT_JSON).read_json()
    except (OSError, ValueError, RunError):
        return None
    return report if isinstance(report, dict) else None


def published(out: Location) -> dict[str, Any] | None:
    """The report of the verified export that `out` holds, if it holds one made by export."""
    if ownership.why_not_replaceable(out, "export") is not None:
        return None
    report = read_report(out)
    return report if report is not None and report.get("verified") is True else None


def rejected_dir(out: Location) -> Location:
    """Where a rejected export goes: `<out>.rejected`, beside it."""
    return out.parent / f"{out.name}.rejected"


def check_output_dir(out: Location, force: bool, protected: tuple[Location, ...] = ()) -> None:
    """Refuse, before any work, an --out that export could not replace without losing something.

    Only a folder holding nothing but an earlier export's own files (`ownership`) is ever
    replaced, and a verified one only with --force; the same holds for `<out>.rejected`.
    """
    fix = "choose another --out (an export never replaces a folder it did not write)"
    ownership.check_replaceable(out, "export", protected, fix)
    ownership.check_replaceable(rejected_dir(out), "export", protected, fix)
    if (read_report(out) or {}).get("verified") is True and not force:
        raise ExportError(f"{out}: holds a previous verified export. Fix: pass --force to replace it, or choose another --out.")


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, work: Path, int4: bool = False) -> None:
    """Static QDQ int8 with ONNX Runtime's tools: pre-process, then calibrate on training images.

    Weights use 7 of their 8 bits (`reduce_range`). x86 CPUs without VNNI (AVX2, and
    AVX-512 before Cascade Lake) multiply u8 x s8 with VPMADDUBSW, whose int16 pairwise
    sums saturate at full range, which costs accuracy. The file must be right on whatever
    device runs it, not only on the machine that exported it.

    The first convolution stays in fp32: it sees one input channel, where ONNX Runtime's
    `QLinearConv` is slower than the fp32 `Conv`, and it keeps the layer that reads raw
    pixels exact. ONNX Runtime's QDQ propagation would move the next QuantizeLinear above
    the first max-pool and run that pool in uint8 NCHW, slowly, so the model records that
    optimizer as one to switch off (`META_SESSION`), and the edge runtime's `open_session`
    does. Figures: docs/benchmarks.md#the-int8-models-choices.

    With `int4`, the weights are 4-bit (all 16 levels: ONNX Runtime dequantizes them to float,
    so no integer sums can saturate), in opset 21's standard DequantizeLinear.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "model.prep.onnx"
    if int4:
        from onnx import version_converter

        onnx.save(version_converter.convert_version(onnx.load(fp32_path), INT4_OPSET), prepared)
        fp32_path = prepared
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 100)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {onnx_graph.INPUT_NAME: batch}

    first_conv = next((n.name for n in onnx.load(prepared).graph.node if n.op_type == "Conv"), None)
    quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=not int4, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if int4 else QuantType.QInt8,
                    nodes_to_exclude=[first_conv] if first_conv else [])
    prepared.unlink()


def to_ort(onnx_path: Path, ort_path: Path) -> None:
    """The ONNX Runtime format of a model, for ORT's minimal and mobile builds, made as
    `onnxruntime.tools.convert_onnx_models_to_ort` makes it (optimized once, at every level,
    "Fixed" style), but for any CPU: without the x86-only NCHWc layout, as the tool does for
    non-amd64 targets, and with the optimizers the model itself switches off (META_SESSION)."""
    import onnxruntime as ort
    from mnist_edge.runtime import session_settings

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    disabled = ["NchwcTransformer", *session_settings(onnx_path).get("disabled_optimizers", [])]
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def write_required_operators(ort_paths: list[Path], config: Path) -> None:
    """The operators (by domain and opset) the .ort models use: the config a reduced ONNX
    Runtime build takes, so that it holds only those kernels."""
    import contextlib
    import io
    import logging

    from onnxruntime.tools.convert_onnx_models_to_ort import create_config_from_models

    with contextlib.redirect_stdout(io.StringIO()):  # the tool prints and logs what it did
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
        create_config_from_models(ort_paths, config, enable_type_reduction=False)
    # Its header names the models by this machine's (temporary) paths: keep their names only.
    lines = config.read_text().splitlines()
    config.write_text("\n".join(f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line for line in lines) + "\n")


def _compare(name: str, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, path: Path,
             tf_accuracy: float) -> dict[str, Any]:
    from mnist_dist.timing import latency_us, ort_session, throughput

    diff = np.abs(logits - reference)
    session = ort_session(path, threads=1)
    one = np.zeros((1, 28, 28, 1), np.float32)
    batch = np.zeros((256, 28, 28, 1), np.float32)
    latency = latency_us(lambda: session.run(None, {onnx_graph.INPUT_NAME: one}))
    return {
        "file": path.name,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "argmax_disagreements": int((logits.argmax(1) != reference.argmax(1)).sum()),
        "tf_accuracy": tf_accuracy,
        "ort_accuracy": float((logits.argmax(1) == labels).mean()),
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "latency_us_p50": latency["p50"],
        "latency_us_p99": latency["p99"],
        "throughput_b256": throughput(lambda: session.run(None, {onnx_graph.INPUT_NAME: batch}), 256, seconds=1.0),
        "threads": 1,
    }


def ort_logits(path: Path, images: np.ndarray, batch: int = 1000, log=print) -> np.ndarray:
    from mnist_dist.progress import track
    from mnist_dist.timing import ort_session

    session = ort_session(path, threads=os.cpu_count() or 1)
    batches = (images[i: i + batch] for i in range(0, len(images), batch))
    return np.concatenate([session.run(None, {onnx_graph.INPUT_NAME: x})[0]
                           for x in track(batches, len(images), f"  ONNX Runtime {path.name}", " images", log=log)])


def export(run: Where | None = None, checkpoint: Where | None = None, out: Where | None = None,
           options: ExportOptions = ExportOptions(), log=print) -> dict[str, Any]:
    """Export a run's best checkpoint (or `checkpoint`) to `out` (default RUN/export), holding
    the run's lock throughout; returns the report (its "verified" says whether it was published)."""
    from mnist_dist import rundir

    options.validate()
    run, checkpoint = (Location.of(x) if x is not None else None for x in (run, checkpoint))
    out = Location.of(out) if out is not None else None
    if run is None:
        return _export(None, checkpoint, out, options, log)
    with rundir.locked(run, "export", create=False):
        return _export(run, checkpoint, out, options, log)


def _export(run: Location | None, checkpoint: Location | None, out: Location | None, options: ExportOptions,
            log) -> dict[str, Any]:
    from mnist_dist.config import TrainConfig
    from mnist_dist.data import load_for

    ckpt_dir, run_dir = resolve_checkpoint(run, checkpoint)
    out_dir = out or (run_dir or ckpt_dir.parent) / "export"
    protected = tuple(p for p in (run_dir, ckpt_dir) if p)  # what this command reads
    check_output_dir(out_dir, options.force, protected)
    try:
        model, state = load_model_at(ckpt_dir)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    config = TrainConfig.from_saved(state["config"])
    data = load_for(config)
    log(f"exporting {config.model} from {ckpt_dir} (epoch {state['epoch']}, validation accuracy {100 * state['val_accuracy']:.2f}%)")

    staged = False
    try:
        with out_dir.staging() as work:
            staged = True
            report = _build(work, model, state, config, data, ckpt_dir, run_dir, options, log)
            publish(work, out_dir, report["verified"], protected)
    except (OSError, StorageError) as exc:  # a full disk or a folder made read-only meanwhile: nothing was published
        why = exc.reason if isinstance(exc, StorageError) else exc.strerror or exc
        if not staged:
            raise ExportError(f"{out_dir}: cannot write the export there ({why}). "
                              "Fix: choose a writable --out, or free space there.") from None
        raise ExportError(f"{out_dir}: writing the export failed ({why}); nothing was published. "
                          "Fix: free space there, or choose another --out.") from None
    if report["verified"]:
        log(f"verified export written to {out_dir}")
    else:
        for rule in report["rules"]:
            if not rule["passed"]:
                log(f"FAILED rule {rule['rule']}: {rule['detail']}")
        log(f"export REJECTED: nothing was published to {out_dir}; the rejected files are in {rejected_dir(out_dir)}")
    return report


def _build(work: Path, model, state: dict[str, Any], config, data, ckpt_dir: Location, run_dir: Location | None,
           options: ExportOptions, log) -> dict[str, Any]:
    """Convert, quantize and verify into the local folder `work`; returns the report written there."""
    from mnist_dist.data import normalize
    from mnist_dist.evaluate import predict_logits

    ownership.mark(work, "export")
    started = time.perf_counter()
    proto = onnx_graph.short_names(onnx_graph.fold_flatten_transpose(onnx_graph.convert(model, options.opset)))
    metadata = {
        META_NORMALIZATION: json.dumps({"offset": PIXEL_OFFSET, "scale": PIXEL_SCALE, "layout": "NHWC",
                                        "formula": "(pixel - offset) / scale", "pixels": "uint8, white digit on black"}),
        META_LABELS: json.dumps([str(i) for i in range(10)]),
        "mnist_dist.model": config.model,
        # The run's name and the checkpoint's digest: what identifies the weights on any
        # machine, where the training machine's paths would mean nothing.
        "mnist_dist.run": config.name or (run_dir or ckpt_dir).name,
        "mnist_dist.checkpoint": ckpt_dir.name,
        "mnist_dist.checkpoint_sha256": state["model_sha256"],
        "mnist_dist.opset": str(options.opset),
    }
    onnx_graph.set_metadata(proto, metadata)
    import onnx
    onnx.checker.check_model(proto)
    onnx.save(proto, work / FP32_FILE)
    log(f"converted to ONNX opset {options.opset} in {time.perf_counter() - started:.1f} s: {' '.join(onnx_graph.op_types(proto))}")

    # Calibrate on training images only: the test set never chooses anything.
    calibration = normalize(data.train_x[:options.calibration_images])
    quantize_int8(work / FP32_FILE, work / INT8_FILE, calibration, work)
    int8 = onnx_graph.short_names(onnx.load(work / INT8_FILE))
    onnx_graph.set_metadata(int8, {**metadata, META_SESSION: json.dumps(INT8_SESSION)})
    onnx.save(int8, work / INT8_FILE)
    log(f"quantized to int8 (static QDQ, per-channel, first convolution in fp32, {len(calibration)} training images for calibration)")
    if options.int4:
        quantize_int8(work / FP32_FILE, work / INT4_FILE, calibration, work, int4=True)
        int4 = onnx_graph.short_names(onnx.load(work / INT4_FILE))
        onnx_graph.set_metadata(int4, {**metadata, META_SESSION: json.dumps(INT4_SESSION), "mnist_dist.opset": str(INT4_OPSET)})
        onnx.save(int4, work / INT4_FILE)
        log(f"quantized to int4 weights (opset {INT4_OPSET}, as int8 otherwise; no .ort twin: ORT's format cannot hold int4)")
    for onnx_file, ort_file in ORT_FILES.items():
        to_ort(work / onnx_file, work / ort_file)
    write_required_operators([work / f for f in ORT_FILES.values()], work / REQUIRED_OPERATORS)
    log(f"converted both to the ONNX Runtime format ({', '.join(ORT_FILES.values())}; {REQUIRED_OPERATORS} "
        "for a reduced build)")

    log(f"verifying on all {len(data.test_y)} test images ...")
    test_x = normalize(data.test_x)
    reference = predict_logits(model, data.test_x, log=log)
    tf_accuracy = float((reference.argmax(1) == data.test_y).mean())
    sections = {}
    for name, filename in (("fp32", FP32_FILE), ("int8", INT8_FILE),
                           ("fp32_ort", ORT_FILES[FP32_FILE]), ("int8_ort", ORT_FILES[INT8_FILE]),
                           *([("int4", INT4_FILE)] if options.int4 else [])):
        logits = ort_logits(work / filename, test_x, log=log)
        log(f"  timing {filename}: batch-1 latency and batch-256 throughput, 1 thread ...")
        sections[name] = _compare(name, logits, reference, data.test_y, work / filename, tf_accuracy)
    rules = (verification_rules(sections, options.tolerance, options.max_int8_drop_pp)
             + verification_rules({"fp32": sections["fp32_ort"], "int8": sections["int8_ort"]}, options.tolerance,
                                  options.max_int8_drop_pp, prefix="ort_"))
    if options.int4:
        rules.append(accuracy_drop_rule("int4", sections["int4"], options.max_int4_drop_pp))
    report = {
        "schema_version": SCHEMA_VERSION,
        "verified": all(rule["passed"] for rule in rules),
        "rules": rules,
        "fp32": sections["fp32"],
        "int8": sections["int8"],
        # The same models in the ONNX Runtime format, verified alike, and the operators a
        # reduced ORT build needs for them.
        "ort_format": {"fp32": sections["fp32_ort"], "int8": sections["int8_ort"],
                       "required_operators": REQUIRED_OPERATORS},
        **({"int4": sections["int4"]} if options.int4 else {}),
        "test_images": len(data.test_y),
        "data_source": data.source,
        "model": config.model,
        "checkpoint": checkpoint_name(ckpt_dir, run_dir),  # relative to the run: a copied run stays whole
        "checkpoint_epoch": state["epoch"],
        "checkpoint_val_accuracy": state["val_accuracy"],
        "run": str(run_dir) if run_dir else None,
        "opset": options.opset,
        "input": {"name": onnx_graph.INPUT_NAME, "shape": ["N", 28, 28, 1], "dtype": "float32",
                  "normalization": json.loads(metadata[META_NORMALIZATION])},
        "output": {"name": onnx_graph.OUTPUT_NAME, "shape": ["N", 10], "meaning": "logits"},
        "machine": machine.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(work / REPORT_JSON, report)
    (work / REPORT_MD).write_text(report_markdown(report))
    for line in summary_lines(report):
        log(line)
    return report


def verification_rules(sections: dict[str, dict[str, Any]], tolerance: float, max_int8_drop_pp: float,
                       prefix: str = "") -> list[dict[str, Any]]:
    """The rules an fp32 and an int8 file must pass against TensorFlow (rule names get `prefix`)."""
    fp32 = sections["fp32"]
    return [{**rule, "rule": prefix + rule["rule"]} for rule in [
        {"rule": "fp32_argmax_agreement", "passed": fp32["argmax_disagreements"] == 0,
         "detail": f"{fp32['argmax_disagreements']} of the test images classified differently from TensorFlow (must be 0)"},
        {"rule": "fp32_logit_tolerance", "passed": fp32["max_abs_logit_diff"] <= tolerance,
         "detail": f"max |logit difference| {fp32['max_abs_logit_diff']:.3g} (must be <= {tolerance:g})"},
        accuracy_drop_rule("int8", sections["int8"], max_int8_drop_pp),
    ]]


def accuracy_drop_rule(name: str, section: dict[str, Any], max_drop_pp: float) -> dict[str, Any]:
    """A quantized file may lose at most `max_drop_pp` points of TensorFlow's test accuracy."""
    # Rounded far below one image of 10,000: in floats 0.9635 - 0.9625 is 0.1000000000000001
    # points, and 10 images lost out of 10,000 must pass a limit of 0.1 points.
    drop_pp = round(100 * (section["tf_accuracy"] - section["ort_accuracy"]), 9)
    return {"rule": f"{name}_accuracy_drop", "passed": drop_pp <= max_drop_pp,
            "detail": f"{name} accuracy {100 * section['ort_accuracy']:.2f}% vs TensorFlow {100 * section['tf_accuracy']:.2f}%: "
                      f"drop {drop_pp:.2f} pp (must be <= {max_drop_pp:g} pp)"}


def publish(work: Path, out_dir: Location, verified: bool, protected: tuple[Location, ...] = ()) -> None:
    """Put the finished folder in place (verified) or beside it (`.rejected`); the old one is replaced only now."""
    target = out_dir if verified else rejected_dir(out_dir)
    ownership.publish(work, target, "export", commit=REPORT_JSON, protected=protected,
                      fix="choose another --out (an export never replaces a folder it did not write)")


def sections_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each verified file's figures by a short name: fp32, int8, their .ort twins, and int4 if made."""
    ort_format = report.get("ort_format", {})  # exports before the .ort files have none
    return {"fp32": report["fp32"], "int8": report["int8"],
            **{f"{name} .ort": ort_format[name] for name in ("fp32", "int8") if name in ort_format},
            **({"int4": report["int4"]} if "int4" in report else {})}


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, s in sections_of(report).items():
        lines.append(f"{name}: accuracy ORT {100 * s['ort_accuracy']:.2f}% vs TF {100 * s['tf_accuracy']:.2f}%, "
                     f"{s['argmax_disagreements']} argmax disagreements, max |dlogit| {s['max_abs_logit_diff']:.2e}, "
                     f"{s['size_bytes'] / 1e6:.2f} MB, batch-1 p50 {s['latency_us_p50']:.0f} us / p99 {s['latency_us_p99']:.0f} us, "
                     f"batch-256 {s['throughput_b256']:.0f} img/s (1 thread)")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    verdict = "VERIFIED" if report["verified"] else "REJECTED"
    sections = sections_of(report)
    rows = ["| | " + " | ".join(sections) + " |", "|---|" + "---|" * len(sections)]
    for key, fmt in (("file", "`{}`"), ("ort_accuracy", "{:.4f}"), ("tf_accuracy", "{:.4f}"), ("argmax_disagreements", "{}"),
                     ("max_abs_logit_diff", "{:.2e}"), ("mean_abs_logit_diff", "{:.2e}"), ("size_bytes", "{:,}"),
                     ("latency_us_p50", "{:.0f}"), ("latency_us_p99", "{:.0f}"), ("throughput_b256", "{:.0f}")):
        rows.append(f"| {key} | " + " | ".join(fmt.format(s[key]) for s in sections.values()) + " |")
    rules = [f"- {'pass' if r['passed'] else 'FAIL'} `{r['rule']}`: {r['detail']}" for r in report["rules"]]
    return "\n".join([
        f"# Export report: {verdict}", "",
        f"Model `{report['model']}` from `{report['checkpoint']}` (epoch {report['checkpoint_epoch']}, "
        f"validation accuracy {100 * report['checkpoint_val_accuracy']:.2f}%), ONNX opset {report['opset']}.",
        f"Compared with TensorFlow on all {report['test_images']} test images; latency with 1 thread.", "",
        *rows, "", "## Rules", *rules, "",
    ])
