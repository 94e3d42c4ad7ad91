"""Turn files into uint8 (28, 28) white-on-black digits, the way MNIST was made.

- PNG/JPEG of any size: converted to grey, transparency composited onto a background
  that contrasts with the ink (`flatten`). MNIST digits are white on black; an image
  whose border is mostly bright (mean of the outer 1-pixel frame > 127) is taken as
  black-on-white and inverted. The digit's bounding box is scaled to fit 20x20 and
  placed in a 28x28 frame centred on its centre of mass, as in the original MNIST.
- .npy: uint8 (28, 28), (N, 28, 28) or (N, 28, 28, 1), pixels 0-255 white-on-black;
  or floating point in [0, 1], scaled by 255.
- IDX image files (idx3, gzip or plain), as in the MNIST distribution.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_edge import idx
from mnist_edge.errors import EdgeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """[(name, uint8 (28, 28))] for one input file."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"{path}: input file not found.")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [(str(path), from_image(path))]
    if suffix == ".npy":
        return _named(path, from_npy(path))
    if "idx" in path.name or suffix in {".gz", ".idx"}:
        return _named(path, from_idx(path))
    raise EdgeError(f"{path}: unsupported input type {suffix or '(none)'}. Fix: pass .png, .jpg, .npy or an IDX file.")


def _named(path: Path, batch: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if len(batch) == 1:
        return [(str(path), batch[0])]
    return [(f"{path}[{i}]", image) for i, image in enumerate(batch)]


def from_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise EdgeError(f"{path}: not a readable .npy file ({exc}).") from None
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise EdgeError(f"{path}: shape {array.shape} is not (28, 28), (N, 28, 28) or (N, 28, 28, 1). Fix: resize to 28x28.")
    if len(array) == 0:
        raise EdgeError(f"{path}: the array holds no images.")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise EdgeError(f"{path}: float pixels must lie in [0, 1] (found {array.min():.3g}..{array.max():.3g}). "
                            "Fix: save uint8 0-255, or divide by 255.")
        return np.round(array * 255).astype(np.uint8)
    raise EdgeError(f"{path}: dtype {array.dtype} is not supported. Fix: save uint8 pixels 0-255 or float in [0, 1].")


def from_idx(path: Path) -> np.ndarray:
    array = idx.read(path)
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise EdgeError(f"{path}: an IDX file of shape {array.shape}; expected images (N, 28, 28) "
                        "(is this a labels file?). Fix: pass an idx3 images file.")
    if len(array) == 0:
        raise EdgeError(f"{path}: the IDX file holds no images.")
    return array


def from_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = flatten(image)
    except Image.DecompressionBombError as exc:
        raise EdgeError(f"{path}: refused as a possible decompression bomb ({exc}). Fix: scale the image down; "
                        "a digit needs no more than a few hundred pixels a side.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EdgeError(f"{path}: not a readable image ({exc}).") from None
    return to_mnist(grey)


def flatten(image) -> np.ndarray:
    """Grey pixels (float 0-255) of any PIL image; transparency is composited, not dropped.

    A digit drawn on a transparent canvas usually keeps black (0, 0, 0, 0) in its see-through
    pixels, so dropping alpha leaves dark ink on black. The background put behind it is the
    opposite of the ink (white behind dark strokes, black behind light ones), and `to_mnist`
    then turns it white-on-black as for any other image.
    """
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("L"), dtype=np.float32)
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    grey = np.asarray(rgba.convert("L"), dtype=np.float32)
    ink = grey[alpha > 0.5]
    background = 255.0 if ink.size and ink.mean() < 128 else 0.0
    return grey * alpha + background * (1.0 - alpha)


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """Any-size grey image (float 0-255) -> uint8 (28, 28) MNIST-style digit."""
    from PIL import Image

    frame = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if frame.mean() > 127:  # black-on-white: invert to MNIST's white-on-black
        grey = 255.0 - grey
    rows, cols = np.nonzero(grey > 0.2 * grey.max()) if grey.max() > 0 else ([], [])
    if len(rows) == 0:
        return np.zeros((28, 28), np.uint8)
    crop = grey[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    scale = 20.0 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize(size, Image.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    canvas[top: top + small.shape[0], left: left + small.shape[1]] = small
    # Centre of mass to the centre, as LeCun et al. did for MNIST.
    total = canvas.sum()
    if total > 0:
        ys, xs = np.indices(canvas.shape)
        dy, dx = round(13.5 - (ys * canvas).sum() / total), round(13.5 - (xs * canvas).sum() / total)
        canvas = np.roll(np.roll(canvas, dy, axis=0), dx, axis=1)
    return np.clip(canvas, 0, 255).astype(np.uint8)
