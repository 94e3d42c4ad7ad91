"""Reader for the IDX format of the MNIST files (gzip or plain), numpy only.

Shared by the training side (mnist_dist.data) and the edge runtime.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from mnist_edge.errors import EdgeError

# Magic numbers: 0x0000 0x08 (unsigned byte) then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_bytes(path: str | Path) -> bytes:
    """The decompressed content of an IDX file; .gz files are inflated and checked whole."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"{path}: file not found. Fix: check the path, or point --data-dir at a folder with the MNIST IDX files.")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise EdgeError(
            f"{path}: the gzip stream is truncated or corrupt ({exc}). "
            "Fix: delete the file and fetch it again (mnist-dist data download), or copy it anew."
        ) from None


def parse(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a uint8 array: (N, rows, cols) for images, (N,) for labels."""
    if len(content) < 8:
        raise EdgeError(f"{name}: only {len(content)} bytes, too short for an IDX header. Fix: fetch the file again.")
    magic = int.from_bytes(content[0:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise EdgeError(
            f"{name}: wrong magic number 0x{magic:08x} (expected 0x{IMAGES_MAGIC:08x} for images or "
            f"0x{LABELS_MAGIC:08x} for labels): this is not an MNIST IDX file. Fix: use the original "
            "train-/t10k- images/labels files."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(content) < header:
        raise EdgeError(f"{name}: header is cut short. Fix: fetch the file again.")
    dims = [int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) if dims else 0
    body = len(content) - header
    if body != expected:
        raise EdgeError(
            f"{name}: header says {'x'.join(map(str, dims))} = {expected} bytes of data but the file has {body}: "
            "it is truncated or padded. Fix: fetch the file again."
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def read(path: str | Path) -> np.ndarray:
    return parse(read_bytes(path), str(path))
