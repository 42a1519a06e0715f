"""Robust image decoding: any file a user's folder may hold becomes an RGB image or a skip reason.

Pillow opens files lazily and raises late (truncated data shows only on ``load()``), warns
instead of failing on huge images, and hands back whatever mode the file stores. Here every
case is decided once: orientation from EXIF applied, CMYK / palette / alpha / 16-bit / float
converted to 8-bit RGB (alpha composited on a background), and anything that cannot be used
raises `SkippedImage` with a reason a person can act on.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images above this many pixels are refused before decoding (a decompression bomb, or a scan
# far larger than any training resolution). Pillow's own limit is 89.5 Mpx.
DEFAULT_MAX_PIXELS = 64_000_000


class SkippedImage(ValueError):
    """An image that training skips; ``reason`` is a short phrase such as ``"zero-byte file"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read(source: str | bytes | dict | os.PathLike, limit: int = -1) -> bytes:
    """The file's bytes (at most ``limit`` of them from a file) from a path, raw bytes, a
    ``datasets`` Image cell ``{"bytes", "path"}``, or a tar member's cell ``{"path", "offset",
    "size"}`` (`ldm_pipeline.data.archives`)."""
    if isinstance(source, dict) and source.get("offset") is not None:
        size = source["size"] if limit < 0 else min(limit, source["size"])
        return _read_member(source["path"], source["offset"], size)
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
        if source is None:
            raise SkippedImage("empty image cell")
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read(limit)
    except FileNotFoundError as err:
        raise SkippedImage("file not found") from err
    except OSError as err:
        raise SkippedImage(f"unreadable file: {err.strerror or err}") from err


def _read_member(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of an archive: one member, nothing else of the file read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as err:
        raise SkippedImage(f"unreadable tar shard: {err.strerror or err}") from err
    if len(data) < size:
        raise SkippedImage(f"truncated tar member: {len(data)} of {size} bytes")
    return data


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit integer (``I;16*``, ``I``) and float (``F``) greyscale scaled to 8 bits."""
    array = np.asarray(image)
    if image.mode == "F":
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        # Float images are usually in [0, 1]; anything else is stretched to its own range.
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        scaled = (np.nan_to_num(array, nan=low) - low) / max(high - low, 1e-12)
        return Image.fromarray((scaled.clip(0, 1) * 255 + 0.5).astype(np.uint8), "L")
    array = array.astype(np.int64)
    # 16-bit data stored in a 32-bit mode ("I") still spans 0..65535.
    top = 65535 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255
    return Image.fromarray((array.clip(0, top) * 255 // top).astype(np.uint8), "L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An opened image as 8-bit RGB: alpha composited on ``background``, other modes converted."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    # CMYK, YCbCr, L, 1 and the rest: Pillow's conversion (CMYK through its naive transform).
    return image.convert("RGB")


# What `probe_image` reads of a file first: JPEG and PNG headers (EXIF included) fit in it.
_HEADER_BYTES = 1 << 16
# EXIF orientations that turn the stored image a quarter turn (width and height swap).
_QUARTER_TURNS = (5, 6, 7, 8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, opened lazily; refused before any pixel is decoded if too large."""
    if not data:
        raise SkippedImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise SkippedImage("not an image file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkippedImage(f"decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SkippedImage(f"truncated or corrupt image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise SkippedImage(f"{width}x{height} is over the {max_pixels:,}-pixel limit (decompression bomb?)")
    if width == 0 or height == 0:
        raise SkippedImage("image has zero width or height")
    return image


def probe_image(source: str | bytes | dict | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """An image's (width, height) as training sees it (EXIF orientation applied), read from its
    header without decoding the pixels: what bucketing needs, at a fraction of a decode's cost.

    Only the first 64 KiB of a file are read, unless its header runs past them. Files whose data
    is broken past the header are found when they are decoded (`decode_image`).

    Raises:
        SkippedImage: missing, zero-byte, non-image files and images over ``max_pixels``.
    """
    head = _read(source, _HEADER_BYTES)
    try:
        image = _open(head, max_pixels)
    except SkippedImage:
        if len(head) < _HEADER_BYTES:  # that was the whole file
            raise
        image = _open(_read(source), max_pixels)
    width, height = image.size
    with contextlib.suppress(OSError, ValueError, SyntaxError, KeyError):
        if image.getexif().get(0x0112) in _QUARTER_TURNS:
            return height, width
    return width, height


def decode_image(
    source: str | bytes | dict | os.PathLike,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode a file (path, bytes or ``datasets`` Image cell) into an 8-bit RGB image.

    Args:
        draft: the smallest (width, height) the caller needs (orientation applied): a JPEG is
            then decoded at the coarsest of its 1/2, 1/4, 1/8 DCT scales that still covers it
            (Pillow's ``draft``), several times faster than a full decode of a large photo.

    Raises:
        SkippedImage: zero-byte, missing, non-image, truncated or corrupt files, and images over
            ``max_pixels`` (decompression bombs), with the reason.
    """
    image = _open(_read(source), max_pixels)
    try:
        if draft is not None and image.format == "JPEG":
            turned = image.getexif().get(0x0112) in _QUARTER_TURNS
            image.draft("RGB", draft[::-1] if turned else draft)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"), and
        # some plug-ins as SyntaxError or ValueError.
        raise SkippedImage(f"truncated or corrupt image: {err}") from err
    # An unreadable EXIF block keeps the stored orientation rather than losing the image.
    with contextlib.suppress(OSError, ValueError, SyntaxError):
        image = ImageOps.exif_transpose(image)
    return to_rgb(image, background)
