"""The edge runtime on aarch64, as on a Raspberry Pi or a Graviton: Debian's arm64 userland
and PyPI's aarch64 wheels of the edge runtime's dependencies, run under qemu-user on this
x86 machine (`qemu-aarch64-static -L ROOT`, since binfmt handlers may not be registrable).
It checks answers only: timings under emulation mean nothing.

The userland is built once and kept in the user's cache: `debootstrap --foreign` fetches
Debian's arm64 packages (python3 included) and `dpkg -x` unpacks each, since the second
stage would need to run arm64 code as root; pip puts the wheels of the edge extra's hashed
lock for aarch64 (scripts/lock/edge-aarch64.txt, what a device owner installs) into a folder
of their own. onnxruntime reads /proc/cpuinfo when it is imported, and
qemu-user 7.2 shows the host's x86 text there, on which it crashes: the userland carries an
ARM cpuinfo, which `-L` serves in its place.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_edge import idx

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
EDGE_LOCK = Path(__file__).resolve().parent.parent / "scripts" / "lock" / "edge-aarch64.txt"
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
IMAGES = 100  # about 0.1 s an image for the tf-tutorial fp32 model under emulation; edge's are quicker
MAX_PROBABILITY_DIFFERENCE = 1e-5  # what aarch64's kernels may change in a probability; the argmax never
# Two Cortex-A72 cores (a Raspberry Pi 4), as the ARM kernel prints them.
CPUINFO = "".join(f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                  "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
                  "CPU revision\t: 3\n\n" for n in range(2))
# Run inside the userland: each model's probabilities for the images, saved for the host to compare.
PROBE = """
import sys, numpy as np
from mnist_edge import Classifier
images = np.load(sys.argv[1])
np.savez(sys.argv[2], *[Classifier(name).predict(images)[1] for name in sys.argv[3:]])
"""


def tools_or_reason() -> str | None:
    missing = [tool for tool in ("qemu-aarch64-static", "debootstrap", "dpkg") if not shutil.which(tool)]
    return f"{', '.join(missing)} not found: apt-get install qemu-user-static debootstrap" if missing else None


@pytest.fixture(scope="session")
def userland() -> Path:
    """ROOT (Debian arm64 with python3) and ROOT/edge-site (the aarch64 wheels), cached. A
    partial one is never taken for a made one: it is built beside, then renamed into place."""
    reason = tools_or_reason()
    if reason:
        if os.environ.get("CI"):  # .ci/run installs them: missing there is a failure, not a skip
            pytest.fail(reason)
        pytest.skip(reason)
    recipe = "\n".join([SUITE, EDGE_LOCK.read_text(), *PLATFORMS, CPUINFO])
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-dist" / (
        "aarch64-" + hashlib.sha256(recipe.encode()).hexdigest()[:12])
    if (home / "ready").exists():
        return home
    partial = home.with_name(f"{home.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3",
                    SUITE, str(partial), MIRROR], check=True, capture_output=True, timeout=900)
    for deb in sorted((partial / "var" / "cache" / "apt" / "archives").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(partial)], check=True, capture_output=True, timeout=120)
    (partial / "proc").mkdir(exist_ok=True)
    (partial / "proc" / "cpuinfo").write_text(CPUINFO)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(partial / "edge-site"),
                    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
                    *platforms, "--require-hashes", "-r", str(EDGE_LOCK)], check=True, capture_output=True, timeout=900)
    (partial / "ready").write_text(recipe)
    shutil.rmtree(home, ignore_errors=True)
    partial.rename(home)
    return home


def test_the_userland_is_aarch64_and_has_no_tensorflow(userland):
    proc = subprocess.run(["qemu-aarch64-static", "-L", str(userland), str(userland / "usr/bin/python3"), "-c",
                           "import platform, importlib.util as u; print(platform.machine(), "
                           "[m for m in ('tensorflow', 'keras', 'ray', 'onnx') if u.find_spec(m)])"],
                          capture_output=True, text=True, timeout=120, env=arm_env(userland))
    assert proc.returncode == 0 and proc.stdout.split() == ["aarch64", "[]"], proc.stdout + proc.stderr


def arm_env(userland: Path) -> dict[str, str]:
    """Only the userland's wheels and the edge runtime (export/) on the path."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    return {**keep, "PATH": "/usr/bin:/bin", "PYTHONPATH": f"{userland / 'edge-site'}{os.pathsep}{ROOT / 'export'}",
            "PYTHONNOUSERSITE": "1"}


def test_every_exported_file_answers_on_aarch64_as_on_x86(userland, exported, edge_export, mnist_dir, tmp_path):
    """The tf-tutorial and the device model (`edge`), fp32 and int8, .onnx and .ort, and edge's
    int4: the same argmax on every image, and probabilities within MAX_PROBABILITY_DIFFERENCE
    of this machine's."""
    from mnist_edge import Classifier

    images = idx.read(mnist_dir / "t10k-images-idx3-ubyte.gz")[:IMAGES]
    np.save(tmp_path / "images.npy", images)
    exports = {"tf-tutorial": exported["dir"], "edge": edge_export}
    files = [f"{model} {name}" for model in exports for name in ("model.onnx", "model.int8.onnx", "model.ort", "model.int8.ort")]
    files.append("edge model.int4.onnx")
    models = [str(exports[file.split()[0]] / file.split()[1]) for file in files]
    proc = subprocess.run(["qemu-aarch64-static", "-L", str(userland), str(userland / "usr/bin/python3"), "-c", PROBE,
                           str(tmp_path / "images.npy"), str(tmp_path / "aarch64.npz"), *models],
                          capture_output=True, text=True, timeout=900, env=arm_env(userland))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    arm = np.load(tmp_path / "aarch64.npz")
    for i, (name, model) in enumerate(zip(files, models, strict=True)):
        labels, probs = Classifier(model).predict(images)
        theirs = arm[f"arr_{i}"]
        disagreements = int((theirs.argmax(1) != labels).sum())
        difference = float(np.abs(theirs - probs).max())
        print(f"{name}: {len(images)} images on aarch64, {disagreements} argmax disagreements with x86, "
              f"largest probability difference {difference:.2e}")
        assert disagreements == 0 and difference <= MAX_PROBABILITY_DIFFERENCE, name
