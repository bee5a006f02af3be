"""The one exception every dataset loader raises for bad input, and image decoding.

:class:`DatasetError` (a ``ValueError``) always names what is wrong and where: the
expected layout for a missing root or split, the column and file for a CSV without a
needed column, the file and line for a bad label, the file for an unreadable image.
:func:`read_image` turns an image file into a uint8 array and converts every
decoding failure (missing, corrupt, truncated, empty crop) into a ``DatasetError``
naming the file. This file knows nothing about any particular dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: What ``on_error`` may be: fail fast (default) or skip the bad item and record it.
ON_ERROR = ("raise", "skip")
#: File endings read as images by the folder loader (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def check_choice(name: str, value, choices, context: str = "") -> None:
    """``ValueError`` ``"<name>=<value>: expected one of <choices>"`` (``context`` appended) unless
    ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {tuple(choices)}{context}")


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file (and line) or the
    expected layout. ``item``/``where`` carry the item id and ``file:line`` when the
    problem belongs to one item (so ``on_error="skip"`` can record it)."""

    def __init__(self, message: str, *, item: str | None = None, where: str | None = None):
        super().__init__(message)
        self.item = item
        self.where = where


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
    return on_error


def read_image(path: str | os.PathLike, mode: str = "RGB", *, box: tuple[int, int, int, int] | None = None,
               size: int | None = None) -> np.ndarray:
    """Decode an image file into a uint8 array.

    Args:
        path: image file (any format Pillow reads).
        mode: ``"L"`` -> ``(H, W)`` grayscale, ``"RGB"`` -> ``(H, W, 3)``.
        box: optional face box ``(x, y, width, height)`` in pixels of the stored image,
            ``x`` the **column** and ``y`` the **row** of the top-left corner; the crop is
            ``image[y:y + height, x:x + width]``, clipped to the image.
        size: when given, the (cropped) face is resized to ``(size, size)`` (bilinear,
            antialiased when shrinking).

    Raises :class:`DatasetError` naming the file when it is missing, not an image,
    truncated, or when the box leaves nothing of the image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: a truncated file fails here, not later
            img = im.convert(mode) if im.mode != mode else im.copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except UnidentifiedImageError as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data
        raise DatasetError(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})") from None
    if box is not None:
        x, y, w, h = (int(v) for v in box)
        W, H = img.size
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if x1 <= x0 or y1 <= y0:
            raise DatasetError(f"{path}: face box (x={x}, y={y}, w={w}, h={h}) lies outside the "
                               f"{W}x{H} image (x is the column, y the row)")
        img = img.crop((x0, y0, x1, y1))  # PIL boxes are (left, upper, right, lower) = (col, row, col, row)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()
