"""Hostile or unusual input files get one line and bounded memory, never a traceback or a
confident wrong answer (the edge runtime's readers, shared with training)."""
import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mnist_edge import idx, inputs
from mnist_edge.errors import EdgeError


def peak_rss_mb(code: str) -> tuple[float, subprocess.CompletedProcess]:
    """Peak resident memory of a fresh interpreter running `code`.

    Its VmHWM, not getrusage's ru_maxrss: Linux carries a process's peak across exec, so a
    child forked from this 1.5 GB test process would report at least that.
    """
    proc = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                           "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)"],
                          capture_output=True, text=True, timeout=600)
    return int(proc.stderr.strip().splitlines()[-1]) / 1024, proc


def test_a_transparent_png_is_composited_not_dropped(tmp_path, mnist_dir):
    digit = idx.read(mnist_dir / "t10k-images-idx3-ubyte.gz")[0]  # a 7, white on black
    Image.fromarray(digit).save(tmp_path / "plain.png")
    # Black ink on a transparent canvas, as drawing programs save it: the see-through pixels are (0, 0, 0, 0).
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    (_, plain), = inputs.load(tmp_path / "plain.png")
    (_, transparent), = inputs.load(tmp_path / "transparent.png")
    assert transparent.sum() > 0  # dropping alpha left black on black: an empty image
    np.testing.assert_array_equal(transparent, plain)
    # White ink on transparent black goes onto black.
    rgba[..., :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "white.png")
    (_, white), = inputs.load(tmp_path / "white.png")
    np.testing.assert_array_equal(white, plain)


def test_a_decompression_bomb_image_is_refused(tmp_path):
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")  # 196M pixels: a few kB on disk
    with pytest.raises(EdgeError, match="decompression bomb.*Fix: scale the image down"):
        inputs.load(tmp_path / "bomb.png")


def test_an_idx_header_whose_size_overflows_int64_is_refused(tmp_path):
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 0x803, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + b"\0" * 64)
    with pytest.raises(EdgeError, match="more than the 1,073,741,824 mnist-dist reads"):
        idx.read(path)


def test_a_small_gzip_claiming_a_huge_body_is_refused_without_inflating_it(tmp_path):
    # 400 MB of zeros behind an MNIST-sized header: under 1 MB of gzip. The old reader inflated it whole.
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">IIII", 0x803, 10000, 28, 28))
        zeros = bytes(1 << 24)
        for _ in range(25):
            f.write(zeros)
    assert path.stat().st_size < 2 << 20
    peak, proc = peak_rss_mb(f"from mnist_edge import idx, errors\ntry:\n    idx.read({str(path)!r})\n"
                             "except errors.EdgeError as e:\n    print(e)")
    assert "its IDX header lies" in proc.stdout, proc.stdout + proc.stderr
    baseline, _ = peak_rss_mb("from mnist_edge import idx, errors")
    assert peak - baseline < 50, f"{peak:.0f} MB peak, {baseline:.0f} MB for the imports alone"


@pytest.mark.slow
def test_predict_runs_in_batches_with_bounded_memory(exported, mnist_dir):
    """10,000 images in one call: tf-tutorial's first convolution alone is 1 GB of float32 at once."""
    peak, proc = peak_rss_mb(f"import sys\nfrom mnist_edge.cli import main\nsys.argv = ['mnist-edge']\n"
                             f"code = main(['--model', {str(exported['dir'])!r}, '--json', "
                             f"{str(mnist_dir / 't10k-images-idx3-ubyte.gz')!r}])\nassert code == 0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions = json.loads(proc.stdout)["predictions"]
    labels = idx.read(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert len(predictions) == 10000
    assert np.mean([p["label"] == y for p, y in zip(predictions, labels)]) > 0.9
    assert peak < 700, f"{peak:.0f} MB peak"
