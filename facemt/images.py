"""Decoding images safely: EXIF orientation, any mode to RGB, one error type."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facemt.errors import FacemtError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def is_image_file(path: Path) -> bool:
    """True if the file name has an image extension (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any Pillow mode to 8-bit RGB.

    Transparent images are composited on white; 16-bit and float greyscale is
    rescaled to 0-255 rather than clipped.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


MAX_ASPECT = 8.0


def check_shape(size: tuple[int, int], name: object = "image") -> None:
    """Reject empty images and extreme aspect ratios (no face photo is 20000 x 10)."""
    w, h = size
    if w < 1 or h < 1:
        raise FacemtError(f"{name}: image has no pixels ({w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise FacemtError(f"{name}: {w}x{h} pixels is not a face photo (aspect ratio above {MAX_ASPECT:g}:1)")


def decode_file(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open an image file as RGB, letting JPEG decode at reduced scale when possible.

    Args:
        path: the image file.
        min_side: if given, the decoder may skip detail below this shorter side
            (JPEG draft mode), which makes huge photos cheap to open.

    Raises:
        FacemtError: the file is missing, empty, not an image, truncated or a
            decompression bomb.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_shape(im.size, path)
                if min_side and im.format == "JPEG":
                    w, h = im.size
                    scale = min_side / min(w, h)
                    if scale < 1:
                        im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
                im.load()
                return to_rgb(im)
    except FileNotFoundError:
        raise FacemtError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FacemtError(f"{path}: is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FacemtError(f"{path}: image too large ({exc})") from None
    except UnidentifiedImageError:
        kind = "empty file" if path.stat().st_size == 0 else "not a readable image"
        raise FacemtError(f"{path}: {kind}") from None
    except FacemtError:
        raise
    except Exception as exc:  # Pillow raises many types on malformed files
        raise FacemtError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """0-255 pixels from a wider array: floats in [0, 1] are scaled by 255, values
    already in 0-255 are kept; uint16 and anything else out of 0-255 is stretched
    from its own minimum and maximum, as a 16-bit PNG file is by :func:`to_rgb`
    (clipping would turn a 16-bit photo white)."""
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise FacemtError("array holds NaN or infinite values: not an image")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating) and 0.0 <= lo and hi <= 1.0:
        values = values * 255.0
    elif arr.dtype == np.uint16 or lo < 0 or hi > 255:
        values = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    return np.round(values).astype(np.uint8)


def as_rgb_image(image: ImageInput, min_side: int | None = None) -> Image.Image:
    """Turn a path, PIL image or HxW / HxWxC uint8 array into an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return decode_file(image, min_side)
    if isinstance(image, Image.Image):
        check_shape(image.size)
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise FacemtError(f"array of shape {image.shape} is not an HxW or HxWx3/4 image")
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise FacemtError(f"array of dtype {arr.dtype} is not an image (use uint8, uint16 or float)")
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr)
        check_shape((arr.shape[1], arr.shape[0]))
        return to_rgb(Image.fromarray(arr))
    raise FacemtError(f"cannot read an image from a {type(image).__name__}")


def iter_image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, image extensions only) into a sorted list.

    Raises:
        FacemtError: a path that does not exist (a user's typo, not an unreadable image).
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FacemtError(f"{p}: no such file or folder")
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q)))
        else:
            out.append(p)
    return out
