"""The GPU check's verdicts and figures (scripts/gpu-check.sh): OUT/gpu-check.json and a summary.

Reads each run's result.json, the workers' "GPU worker: TensorFlow sees N GPU(s) ...;
collective X" line in its log, and the export's report.json. Standard library only, so it
runs with the bare Python that started the check.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

RUNS = {"fp32": "NCCL or none", "bf16": "NCCL or none", "shared": "RING"}
MIN_TEST_ACCURACY = 0.97  # 2 epochs of the tutorial CNN on real MNIST reach about 98.5-99%


def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_run(name: str, runs: Path, out: Path, real_data: bool) -> dict:
    log = (out / f"{name}.log").read_text() if (out / f"{name}.log").is_file() else ""
    seen = re.search(r"GPU worker: TensorFlow sees (\d+) GPU\(s\) \(([^)]*)\); collective (\S+)", log)
    result = read(runs / name / "result.json") or {}
    history = result.get("history") or [{}]
    figures = {
        "exit_code": int((out / f"{name}.rc").read_text()) if (out / f"{name}.rc").is_file() else None,
        "gpus_seen": int(seen.group(1)) if seen else 0,
        "devices": seen.group(2) if seen else None,
        "collective": seen.group(3) if seen else None,
        "workers": result.get("workers"),
        "images_per_second": history[-1].get("images_per_second"),
        "test_accuracy": result.get("test_accuracy"),
    }
    checks = {
        "ran": figures["exit_code"] == 0 and bool(result),
        "on_gpu": figures["gpus_seen"] >= 1,
        "collective": (figures["collective"] == "RING") if RUNS[name] == "RING"
        else figures["collective"] in ("NCCL", "none"),
        "accuracy": (not real_data) or (figures["test_accuracy"] or 0) >= MIN_TEST_ACCURACY,
    }
    return {**figures, "checks": checks, "passed": all(checks.values())}


def main(runs: str, out: str) -> int:
    runs_dir, out_dir = Path(runs), Path(out)
    real_data = os.environ.get("REAL_DATA") == "1"
    summary = {"real_data": real_data, "runs": {name: check_run(name, runs_dir, out_dir, real_data) for name in RUNS}}
    report = read(runs_dir / "fp32" / "export" / "report.json") or {}
    summary["export"] = {"verified": report.get("verified") is True,
                         "fp32_argmax_disagreements": (report.get("fp32") or {}).get("argmax_disagreements"),
                         "int8_ort_accuracy": (report.get("int8") or {}).get("ort_accuracy")}
    summary["passed"] = all(run["passed"] for run in summary["runs"].values()) and summary["export"]["verified"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-check.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    for name, run in summary["runs"].items():
        failed = [check for check, ok in run["checks"].items() if not ok]
        print(f"{name}: {run['workers']} worker(s), {run['gpus_seen']} GPU(s) seen, collective {run['collective']}, "
              f"{run['images_per_second'] or 0:.0f} img/s, test accuracy {run['test_accuracy']}"
              + (f"  FAILED: {', '.join(failed)}" if failed else "  ok"))
    print(f"export of fp32: {'verified' if summary['export']['verified'] else 'NOT verified'}")
    print(f"gpu check {'PASSED' if summary['passed'] else 'FAILED'}: {out_dir / 'gpu-check.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
