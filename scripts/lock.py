"""Refresh the hashed lock files in scripts/lock/: one for each extra that gets installed, for
CPython 3.11 on Linux x86_64 and aarch64, made by uv's `pip compile --generate-hashes`.

    pip install uv && python scripts/lock.py

`dev` (what CI installs) is resolved first and the others within it (`-c`), so every package
the image ships (`train`) has the version CI tested. Each file's first line is the hash of
pyproject.toml's dependency tables; tests/test_hashlock.py fails when they drift apart.
docs/install.md says which install to use when.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "scripts" / "lock"
PYTHON = "3.11"
# `uname -m` names the file; uv's target names the platform (manylinux_2_28: glibc 2.28 or newer,
# which Debian 10+, Ubuntu 20.04+ and the Ray images have).
MACHINES = {"x86_64": "x86_64-manylinux_2_28", "aarch64": "aarch64-manylinux_2_28"}
# dev first: the others are resolved within it. bench-peer is a venv of its own (the peers of
# `mnist-dist bench`); within dev too, so what both hold is the same files. mlflow-server is
# the tests' MLflow server, a venv of its own that cannot be within dev (pyarrow).
EXTRAS = ("dev", "train", "train-gpu", "edge", "mlflow", "bench-peer", "mlflow-server")
STANDALONE = ("dev", "mlflow-server")
HEADER = "# pyproject-sha256: "


def dependency_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The hash of what a lock is made from: requires-python and every dependency table."""
    project = tomllib.loads(pyproject.read_text())["project"]
    tables = {key: project.get(key) for key in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def lock_path(extra: str, machine: str) -> Path:
    return LOCK_DIR / f"{extra}-{machine}.txt"


def compile_lock(uv: str, extra: str, machine: str, out: Path, within: Path | None) -> None:
    command = [uv, "pip", "compile", "pyproject.toml", "--extra", extra, "--generate-hashes", "--quiet",
               "--python-version", PYTHON, "--python-platform", MACHINES[machine], "--no-header",
               "--annotation-style", "line", "-o", str(out)]
    if within:
        command += ["-c", str(within)]
    subprocess.run(command, cwd=ROOT, check=True)
    # The constraint file is named by its temporary path: name it as it will be.
    body = out.read_text().replace(str(within), f"scripts/lock/{within.name}") if within else out.read_text()
    out.write_text(f"{HEADER}{dependency_hash()}\n"
                   f"# The {extra} extra for CPython {PYTHON} on Linux {machine}. Made by `python scripts/lock.py`; "
                   "do not edit.\n" + body)


def main() -> int:
    uv = shutil.which("uv")
    try:  # dev installs uv into the venv, whose bin may not be on PATH
        import uv as uv_package
        uv = uv or uv_package.find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    if uv is None:
        print("uv not found. Fix: pip install uv, then run python scripts/lock.py again.", file=sys.stderr)
        return 2
    # Every file is made in a scratch folder and moved in only once all are made: a failed
    # refresh leaves the old set whole.
    with tempfile.TemporaryDirectory() as scratch:
        made = []
        for machine in MACHINES:
            dev = Path(scratch) / lock_path("dev", machine).name
            for extra in EXTRAS:
                out = Path(scratch) / lock_path(extra, machine).name
                # uv keeps the versions already in an output file where they still fit: a
                # refresh for one new extra does not move every other pin.
                if lock_path(extra, machine).exists():
                    shutil.copy(lock_path(extra, machine), out)
                compile_lock(uv, extra, machine, out, within=None if extra in STANDALONE else dev)
                made.append(out)
        LOCK_DIR.mkdir(exist_ok=True)
        for out in made:
            shutil.move(out, LOCK_DIR / out.name)
            print(f"wrote scripts/lock/{out.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
