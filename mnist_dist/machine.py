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
