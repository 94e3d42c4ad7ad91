"""What a figure was measured on: CPU, cores, the instructions that matter, library versions.

Reads versions from package metadata, so describing the machine imports no framework.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

LIBRARIES = ("numpy", "tensorflow", "tensorflow-cpu", "keras", "ray", "tf2onnx", "onnx", "onnxruntime")
# The instructions that decide fp32/bf16/int8 speed on x86.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


# Without one of these, TensorFlow emulates bfloat16 arithmetic on the CPU.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def slow_bf16_warning(flags: set[str] | None = None) -> str | None:
    """A warning when this x86 CPU cannot compute in bfloat16, else None.

    There TensorFlow emulates bf16, many times slower than fp32 (docs/benchmarks.md).
    CPUs that list no x86 flags (ARM) are not judged.
    """
    flags = _cpuinfo()[1] if flags is None else flags
    if not flags or any(flag in flags for flag in BF16_FLAGS):
        return None
    return ("warning: this CPU has neither AVX-512-BF16 nor AMX, so TensorFlow emulates bfloat16 and "
            "--precision bf16 trains several times slower than fp32. Fix: use --precision fp32 on this "
            "machine; bf16 pays off on CPUs with AMX or AVX-512-BF16, and on GPUs.")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> dict[str, Any]:
    model, flags = _cpuinfo()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model,
        "cores": usable_cores(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": versions,
    }


def summary_lines(info: dict[str, Any]) -> list[str]:
    flags = " ".join(info["cpu_flags"]) or "none of " + " ".join(CPU_FLAGS)
    return [f"machine: {info['cpu']}, {info['cores']} cores, flags: {flags}",
            "versions: python " + info["python"] + ", " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())]
