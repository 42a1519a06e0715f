"""Prompt adherence for the shapes dataset, judged by geometry with no learned model.

Background: the palette colour nearest the median border pixel. Foreground: pixels far from
the background (after a 3x3 majority filter). Colour: the palette colour nearest the median
foreground pixel. Shape, from each pixel's foreground coverage ``alpha`` in [0, 1] (its position
between the background and foreground colours), so that anti-aliased or blurred edges count for
what they cover:

- triangle: the coverage's vertical skewness; the dataset's triangles point up, so it is about
  -0.57 for a triangle and 0 for a circle or square (blur leaves the third cumulant unchanged);
- otherwise square or circle by area over bounding-box area (square 1, circle π/4), the area being
  the sum of ``alpha`` and the box's sides the largest row and column sums (blur keeps those).

Cut points lie half-way between the shapes' values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from ..data.shapes import BACKGROUNDS, COLORS

_BG_NAMES = list(BACKGROUNDS)
_BG = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)
_FG_NAMES = list(COLORS)
_FG = np.array([COLORS[n] for n in _FG_NAMES], dtype=np.float32)
# Pixels this far (RGB distance) from the background colour count as foreground.
_FOREGROUND_DISTANCE = 60.0
_SQUARE_CUT = (1.0 + np.pi / 4) / 2
# The vertical skewness of an upward triangle's area, whose density grows linearly downwards.
_TRIANGLE_SKEW = -2 * np.sqrt(2) / 5
_TRIANGLE_CUT = _TRIANGLE_SKEW / 2


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """How many pixels of each 3x3 neighbourhood are set."""
    padded = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def _coverage(rgb: np.ndarray, mask: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Each pixel's share of foreground, 0 away from the mask and its one-pixel edge."""
    direction = fg - bg
    alpha = np.clip((rgb - bg) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    return alpha * (_neighbours(mask) > 0)


def analyse(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Read shape, colour and background off one image (None where no shape is found)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_pixel = np.median(border, axis=0)
    background = _BG_NAMES[int(np.argmin(np.linalg.norm(_BG - bg_pixel, axis=1)))]
    # 3x3 majority filter: drops isolated noisy pixels that would stretch the bounding box.
    mask = _neighbours(np.linalg.norm(rgb - bg_pixel, axis=-1) > _FOREGROUND_DISTANCE) >= 5
    if mask.sum() < 2:
        return {"shape": None, "color": None, "background": background}
    fg_pixel = np.median(rgb[mask], axis=0)
    color = _FG_NAMES[int(np.argmin(np.linalg.norm(_FG - fg_pixel, axis=1)))]
    alpha = _coverage(rgb, mask, bg_pixel, fg_pixel)
    rows = alpha.sum(axis=1)
    y = np.arange(len(rows)) - (np.arange(len(rows)) * rows).sum() / rows.sum()
    skew = (y**3 * rows).sum() / rows.sum() / ((y**2 * rows).sum() / rows.sum()) ** 1.5
    fill = alpha.sum() / (rows.max() * alpha.sum(axis=0).max())
    shape = "triangle" if skew <= _TRIANGLE_CUT else "square" if fill >= _SQUARE_CUT else "circle"
    return {"shape": shape, "color": color, "background": background}


def adherence(images: Iterable[Image.Image], labels: Sequence[dict[str, str]]) -> dict[str, float]:
    """Fractions of images whose colour, shape, background, and all three, match their labels."""
    hits = {"color": 0, "shape": 0, "background": 0, "all": 0}
    count = 0
    for image, want in zip(images, labels, strict=True):
        got = analyse(image)
        ok = {k: got[k] == want[k] for k in ("color", "shape", "background")}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
        count += 1
    if count == 0:
        raise ValueError("adherence needs at least one image")
    return {
        "all_correct": hits["all"] / count,
        "color_accuracy": hits["color"] / count,
        "shape_accuracy": hits["shape"] / count,
        "background_accuracy": hits["background"] / count,
    }
