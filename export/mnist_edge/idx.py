"""Reader for the IDX format of the MNIST files (gzip or plain), numpy only.

Shared by the training side (mnist_dist.data) and the edge runtime.
"""
from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path

import numpy as np

from mnist_edge.errors import EdgeError

# Magic numbers: 0x0000 0x08 (unsigned byte) then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


# MNIST's largest file is 47 MB; a header claiming more than this is refused before any
# memory is spent on it (a small gzip can claim, and inflate to, gigabytes).
MAX_BYTES = 1 << 30


def _header(stream, name: str) -> tuple[bytes, list[int]]:
    """The header bytes and the dimensions they declare, read from the front of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        raise EdgeError(f"{name}: only {len(head)} bytes, too short for an IDX header. Fix: fetch the file again.")
    magic = int.from_bytes(head, "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise EdgeError(
            f"{name}: wrong magic number 0x{magic:08x} (expected 0x{IMAGES_MAGIC:08x} for images or "
            f"0x{LABELS_MAGIC:08x} for labels): this is not an MNIST IDX file. Fix: use the original "
            "train-/t10k- images/labels files."
        )
    ndim = magic & 0xFF
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise EdgeError(f"{name}: header is cut short. Fix: fetch the file again.")
    return head + sizes, [int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim)]


def _gzip_isize(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(-4, 2)
        return int.from_bytes(f.read(4), "little")


def read_bytes(path: str | Path) -> bytes:
    """The decompressed content of an IDX file (gzip or plain), read as a stream and never
    more than its header declares: a lying header is refused before its data is read."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"{path}: file not found. Fix: check the path, or point --data-dir at a folder with the MNIST IDX files.")
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            head, dims = _header(stream, str(path))
            expected = math.prod(dims)  # Python ints: a header cannot overflow it
            if expected > MAX_BYTES:
                raise EdgeError(f"{path}: header says {'x'.join(map(str, dims))} = {expected:,} bytes of data, more than "
                                f"the {MAX_BYTES:,} mnist-dist reads. Fix: use the original MNIST files, or split this one.")
            # The real size, before a byte is inflated: a plain file's length, or the gzip
            # trailer's (ISIZE, the inflated length mod 2^32).
            real = path.stat().st_size - len(head) if not compressed else (_gzip_isize(path) - len(head)) % (1 << 32)
            if compressed and real != expected % (1 << 32):
                raise EdgeError(f"{path}: the gzip stream is truncated or corrupt, or its IDX header lies: the header says "
                                f"{'x'.join(map(str, dims))} = {expected} bytes of data, the gzip size field {real}. "
                                "Fix: delete the file and fetch it again (mnist-dist data download), or copy it anew.")
            if not compressed and real != expected:
                raise EdgeError(f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data but the file has "
                                f"{real}: it is truncated or padded. Fix: fetch the file again.")
            body = stream.read(expected)
            extra = len(stream.read(1))
    except (EOFError, OSError, zlib.error) as exc:
        raise EdgeError(
            f"{path}: the gzip stream is truncated or corrupt ({exc}). "
            "Fix: delete the file and fetch it again (mnist-dist data download), or copy it anew."
        ) from None
    if len(body) != expected or extra:
        raise EdgeError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data but the file has "
            f"{'more' if extra else len(body)}: it is truncated or padded. Fix: fetch the file again."
        )
    return head + body


def parse(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a uint8 array: (N, rows, cols) for images, (N,) for labels."""
    head, dims = _header(io.BytesIO(content), name)
    expected = math.prod(dims)  # Python ints: np.prod overflows int64 on a crafted header
    body = len(content) - len(head)
    if body != expected:
        raise EdgeError(
            f"{name}: header says {'x'.join(map(str, dims))} = {expected} bytes of data but the file has {body}: "
            "it is truncated or padded. Fix: fetch the file again."
        )
    return np.frombuffer(content, dtype=np.uint8, offset=len(head)).reshape(dims)


def read(path: str | Path) -> np.ndarray:
    return parse(read_bytes(path), str(path))
