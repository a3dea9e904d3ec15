"""Image decoding shared by training (``train.data``) and segmentation (``groupvit.segmentation``).

* Every mode becomes 8-bit RGB *by value*: 16-bit and 32-bit grey (``I;16*``, ``I``) are scaled from 0–65535 to
  0–255 and float grey (``F``) from 0–1 (or from 0–65535 when its maximum exceeds 1); PIL's own ``convert("RGB")``
  clips them instead (a 16-bit PNG becomes almost all white).
* A pixel cap against decompression bombs: the header's ``width × height`` is checked *before* decoding, and an
  image above ``max_pixels`` raises :class:`ImageTooLarge` (the training loader skips and counts it). PIL's own
  bomb warning is replaced by this check, not silenced without one.
* JPEG draft mode: ``open_image(..., draft=(w, h))`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling)
  when the result is still at least ``w × h``, so a large JPEG is never fully decoded when only a small crop of it
  is needed.
* :func:`decode_array` (the training loader's ``augment_on=gpu`` path) decodes JPEGs with libjpeg-turbo through
  ``simplejpeg`` straight into a NumPy array, optionally DCT-scaled (``min_size``); pixels are identical to PIL's
  decode (both are libjpeg-turbo's default "islow" IDCT and fancy upsampling). JPEGs that libjpeg-turbo only warns
  about (e.g. extraneous bytes before a marker) and CMYK/YCCK JPEGs go through PIL, so the set of accepted images
  and their colours are the same as on the PIL path; everything else goes through PIL as well.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
import simplejpeg
from PIL import Image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLarge", "decode_array", "decode_image", "image_size", "open_image", "to_rgb"]

DEFAULT_MAX_PIXELS = 64_000_000  # e.g. 8000 x 8000; PIL warns above 89.5 M and refuses above 179 M pixels

_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_JPEG_SOI = b"\xff\xd8"
_TURBO_COLOURSPACES = ("YCbCr", "Gray", "RGB")  # decoded to RGB by simplejpeg as PIL does; CMYK/YCCK go to PIL


class ImageTooLarge(ValueError):
    """An image whose ``width × height`` exceeds the pixel cap (a possible decompression bomb)."""


def open_image(
    src: bytes | str | os.PathLike | BinaryIO,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Open ``src`` (encoded bytes, a path or a binary file) and read its header only; nothing is decoded yet.

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels (``None``: no cap); PIL's errors for unreadable data.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # replaced by the explicit cap below
        img = Image.open(src)
    try:
        _check_cap(*img.size, max_pixels)
    except ImageTooLarge:
        img.close()
        raise
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", draft)  # libjpeg scales by 1/2, 1/4, 1/8 while the result stays >= draft
    return img


def _check_cap(w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(
            f"image of {w}x{h} = {w * h:,} pixels is above the cap of {max_pixels:,} pixels (a decompression bomb?)"
        )


def _turbo_header(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that simplejpeg decodes like PIL, else ``None`` (then PIL decodes it)."""
    if data[:2] != _JPEG_SOI:
        return None
    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL reads the header (and names what is wrong if it cannot)
    return (w, h) if colourspace in _TURBO_COLOURSPACES else None


def image_size(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header of encoded ``data``, nothing decoded; raises :class:`ImageTooLarge`
    above ``max_pixels`` and PIL's errors for unreadable data."""
    size = _turbo_header(data)
    if size is None:
        return open_image(data, max_pixels).size
    _check_cap(*size, max_pixels)
    return size


def decode_array(
    data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, min_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Encoded ``data`` → ``uint8 [H, W, 3]`` RGB (high-bit-depth grey scaled by value, as :func:`to_rgb`).

    ``min_size=(w, h)``: a JPEG may be decoded DCT-scaled (by libjpeg-turbo's factors 1/8 … 1) to the smallest
    size that is still at least ``w × h``; other formats are decoded at full size. Compare the result's shape with
    :func:`image_size` for the factor.
    """
    size = _turbo_header(data)
    if size is not None:
        _check_cap(*size, max_pixels)
        mw, mh = min_size or (0, 0)
        try:
            return simplejpeg.decode_jpeg(data, "RGB", min_height=mh, min_width=mw)
        except ValueError:
            pass  # a libjpeg warning (strict mode) or damage: PIL decides, as on the PIL path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's palette-transparency notes
        return np.asarray(to_rgb(open_image(data, max_pixels, draft=min_size)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img`` (if still lazy) and return it as 8-bit RGB, high-bit-depth grey scaled by value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img.load()
    if img.mode in _WIDE_GREY or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0
        else:
            arr = arr / 257.0  # 65535 -> 255
        grey = np.nan_to_num(arr, nan=0.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(src: bytes | str | os.PathLike | BinaryIO, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``to_rgb(open_image(src, max_pixels))``: a fully decoded 8-bit RGB PIL image."""
    return to_rgb(open_image(src, max_pixels))
