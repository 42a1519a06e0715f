"""Aspect-ratio buckets: images keep their shape instead of being cropped square.

NovelAI's scheme (and kohya's, SDXL's): a set of (width, height) pairs of about the same area
as ``resolution²``, sides multiples of ``step`` (so the latent fits the UNet's down-sampling),
aspect ratios up to ``max_aspect``. Each image goes to the bucket nearest its aspect ratio, is
resized to cover it and cropped to it; each batch is drawn from one bucket.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from ..errors import InputError

Bucket = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[Bucket]:
    """Buckets of area ≈ ``resolution²`` with sides multiples of ``step``, aspect ≤ ``max_aspect``.

    The square bucket ``(resolution, resolution)`` is always one of them.
    """
    if resolution % step:
        raise InputError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    if max_aspect < 1:
        raise InputError(f"max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = max(step, round(area / width / step) * step)
        if max(width / height, height / width) <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's, on a log scale (2:1 as far as 1:2)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def fit_to_bucket(
    image: Image.Image, bucket: Bucket, crop: str = "center", rng: random.Random | None = None
) -> np.ndarray:
    """Resize ``image`` to cover ``bucket`` (keeping its aspect) and crop to it; uint8 ``[H, W, 3]``.

    Args:
        crop: "center", or "random" (offsets drawn from ``rng``).
    """
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    spare_x, spare_y = image.width - width, image.height - height
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    elif crop == "center":
        left, top = spare_x // 2, spare_y // 2
    else:
        raise InputError(f"crop must be 'center' or 'random', got {crop!r}")
    return np.asarray(image.crop((left, top, left + width, top + height)))
