"""MNIST on disk: find it, verify it, read it, split it. numpy only (no TensorFlow).

Search order for the four IDX files: an explicit directory (--data-dir), then the
MNIST_DATA_DIR environment variable, then the cache (~/.cache/mnist-dist/mnist, or
$MNIST_DIST_CACHE). Only the cache is ever downloaded into, and only when neither of
the others was given: an explicit directory that lacks the files is an error, since a
silent download would hide a typo.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mnist_edge import idx
from mnist_edge.errors import EdgeError

from mnist_dist.errors import MnistDistError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed files: the same whichever mirror re-compressed them.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
# The TensorFlow tutorial's scaling; exported models carry these in their metadata.
PIXEL_OFFSET = 127.5
PIXEL_SCALE = 255.0
VALIDATION_DEFAULT = 5000


class DataError(MnistDistError):
    """Data that cannot be trained on; the message names the file, the problem and the fix."""


@dataclass
class Mnist:
    """uint8 images (N, 28, 28) and int64 labels; normalise with `normalize`."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str  # a directory, or "synthetic"

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def describe(self) -> str:
        kind = "SYNTHETIC data (not MNIST: accuracy figures mean nothing)" if self.synthetic else f"MNIST from {self.source}"
        return f"{kind}: {len(self.train_y)} train, {len(self.val_y)} validation, {len(self.test_y)} test images"


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in the tutorial's (p - 127.5) / 255."""
    return ((images.astype(np.float32) - PIXEL_OFFSET) / PIXEL_SCALE)[..., None]


def cache_dir() -> Path:
    return Path(os.environ.get("MNIST_DIST_CACHE", Path.home() / ".cache" / "mnist-dist")) / "mnist"


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def resolve_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The directory to read, by the search order above; downloads into the cache if needed."""
    for given, origin in ((data_dir, "--data-dir"), (os.environ.get("MNIST_DATA_DIR"), "MNIST_DATA_DIR")):
        if given:
            directory = Path(given).expanduser()
            if not directory.is_dir():
                raise DataError(
                    f"{directory}: directory does not exist (from {origin}). "
                    "Fix: point it at the folder holding the four MNIST IDX files, or leave it unset to use the download cache."
                )
            return directory
    directory = cache_dir()
    missing = [name for name in FILES.values() if _find_file(directory, name) is None]
    if missing and download:
        download_to(directory, missing)
    return directory


_VERIFIED: set[str] = set()


def settle_dir(data_dir: str | os.PathLike | None) -> str | None:
    """The data folder for a run's config, settled in the driver before any worker starts.

    A given folder (--data-dir, else MNIST_DATA_DIR) is verified and made absolute: a Ray
    worker's working directory is not the driver's. None means the download cache, which
    is filled and verified here, and which each worker then finds on its own node
    (`dir_on_this_node`): a cache path is the driver's node's, not another node's.
    """
    directory = resolve_dir(data_dir, download=True).resolve()
    if str(directory) not in _VERIFIED:  # the pipeline settles its config once, its training again
        verify_dir(directory)  # bad data fails here, in seconds
        _VERIFIED.add(str(directory))
    given = data_dir or os.environ.get("MNIST_DATA_DIR")
    return str(directory) if given else None


def dir_on_this_node(settled: str | None) -> Path:
    """Where a worker reads MNIST: the driver's folder if this node has it too, else this
    node's cache, downloaded and verified by SHA-256 here if it is missing."""
    if settled and Path(settled).is_dir():
        return Path(settled)
    directory = cache_dir()
    missing = [name for name in FILES.values() if _find_file(directory, name) is None]
    if missing:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".download.lock", "w") as lock:  # one download per node, not one per worker
            fcntl.flock(lock, fcntl.LOCK_EX)
            missing = [name for name in missing if _find_file(directory, name) is None]
            if missing:
                download_to(directory, missing)
    verify_dir(directory)
    return directory


def download_to(directory: Path, names: list[str]) -> None:
    """Fetch the missing files from the first mirror that answers; verified afterwards by `load`."""
    from keras.utils import (
        get_file,  # the training side has Keras; the edge never downloads
    )

    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        errors = []
        for mirror in MIRRORS:
            try:
                get_file(fname=f"{name}.gz", origin=f"{mirror}{name}.gz", cache_dir=str(directory), cache_subdir=".")
                break
            except Exception as exc:  # each mirror may fail differently; report all of them
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataError(
                f"{directory / name}: missing, and no mirror could be reached ({'; '.join(errors)}). "
                "Fix: copy the four MNIST .gz files there, or pass --data-dir / MNIST_DATA_DIR, or use --synthetic."
            )


def _read(directory: Path, name: str) -> tuple[np.ndarray, Path, str]:
    """(array, path, SHA-256 of the decompressed content); structural problems raise here."""
    path = _find_file(directory, name)
    if path is None:
        raise DataError(
            f"{directory / name}[.gz]: file is missing. "
            f"Fix: put {name}.gz into {directory}, or point --data-dir / MNIST_DATA_DIR at a folder that has it."
        )
    try:
        content = idx.read_bytes(path)
        return idx.parse(content, str(path)), path, hashlib.sha256(content).hexdigest()
    except EdgeError as exc:
        raise DataError(str(exc)) from None


def _check_sha256(path: Path, name: str, digest: str) -> None:
    if digest != SHA256[name]:
        raise DataError(
            f"{path}: SHA-256 of the decompressed content is {digest[:16]}..., expected {SHA256[name][:16]}...: "
            "the file is corrupt or not the canonical MNIST. Fix: delete it and fetch it again."
        )


def _pair(directory: Path, images: str, labels: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split: structure first, then counts, then checksums."""
    (x, x_path, x_digest), (y, y_path, y_digest) = _read(directory, FILES[images]), _read(directory, FILES[labels])
    if x.ndim != 3 or y.ndim != 1:
        raise DataError(f"{x_path}: expected images (N, 28, 28) and labels (N,), got {x.shape} and {y.shape}. "
                        "Fix: check that the images and labels files are not swapped, or fetch them again.")
    if len(x) != len(y):
        raise DataError(
            f"{x_path}: {len(x)} images but {y_path} has {len(y)} labels. "
            "Fix: the two files must come from the same set; fetch both again."
        )
    if verify:
        _check_sha256(x_path, FILES[images], x_digest)
        _check_sha256(y_path, FILES[labels], y_digest)
    return x, y.astype(np.int64)


def load(data_dir: str | os.PathLike | None = None, val_size: int = VALIDATION_DEFAULT, verify: bool = True,
         train_limit: int | None = None) -> Mnist:
    """Real MNIST, split like the tutorial: the first `val_size` training images validate."""
    directory = resolve_dir(data_dir)
    train_x, train_y = _pair(directory, "train_images", "train_labels", verify)
    test_x, test_y = _pair(directory, "test_images", "test_labels", verify)
    return split(train_x, train_y, test_x, test_y, val_size, train_limit, source=str(directory))


def split(train_x, train_y, test_x, test_y, val_size: int, train_limit: int | None, source: str) -> Mnist:
    if val_size >= len(train_y):
        raise DataError(f"--val-size {val_size} leaves no training images out of {len(train_y)}. Fix: choose a smaller --val-size.")
    rest_x, rest_y = train_x[val_size:], train_y[val_size:]
    if train_limit:
        rest_x, rest_y = rest_x[:train_limit], rest_y[:train_limit]
    return Mnist(rest_x, rest_y, train_x[:val_size], train_y[:val_size], test_x, test_y, source)


def synthetic(n_train: int = 6000, n_test: int = 1000, val_size: int = 1000, seed: int = 0,
              train_limit: int | None = None) -> Mnist:
    """Learnable fake digits: each class is a fixed random stroke pattern plus noise.

    Like the tutorial's fake_data, for self-tests on machines without MNIST, but with
    structure a CNN can learn, so a smoke test can also show that training works.
    """
    rng = np.random.default_rng(seed)
    templates = (rng.random((10, 28, 28)) > 0.8).astype(np.float32)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        noise = rng.random((n, 28, 28)) * 0.6
        images = np.clip(templates[labels] * 0.8 + noise, 0, 1)
        return (images * 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = make(n_train + val_size)
    test_x, test_y = make(n_test)
    return split(train_x, train_y, test_x, test_y, val_size, train_limit, source="synthetic")


def verify_dir(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Check a directory's four files; one line per file. Raises DataError on the first problem."""
    directory = resolve_dir(data_dir, download=False)
    lines = [f"MNIST directory: {directory}"]
    for images, labels in (("train_images", "train_labels"), ("test_images", "test_labels")):
        x, y = _pair(directory, images, labels, verify=True)
        for key, array in ((images, x), (labels, y)):
            path = _find_file(directory, FILES[key])
            lines.append(f"  ok  {path.name:<28} {'x'.join(map(str, array.shape)):<11} sha256 {SHA256[FILES[key]][:16]}... (decompressed)")
    lines.append("all 4 files present, checksums match, image and label counts agree")
    return lines


def load_for(config) -> Mnist:
    """The data a run's TrainConfig names: real MNIST from its data_dir, or synthetic."""
    if config.synthetic:
        return synthetic(val_size=config.val_size, seed=config.seed, train_limit=config.train_limit)
    return load(config.data_dir, val_size=config.val_size, train_limit=config.train_limit)
