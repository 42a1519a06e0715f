"""Prompt adherence for the shapes dataset, judged by geometry with no learned model.

Background: the palette colour nearest the median border pixel. Foreground: pixels far from
the background. Colour: the palette colour nearest the median foreground pixel (after a 3x3 majority
filter on the foreground mask). Shape: the
foreground's area over its bounding box's area (square ≈ 1, circle ≈ π/4 ≈ 0.785,
triangle ≈ 0.5), with cut points half-way between.
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
_CIRCLE_CUT = (np.pi / 4 + 0.5) / 2


def _majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority filter: drops isolated noisy pixels that would stretch the bounding box."""
    padded = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def analyse(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Read shape, colour and background off one image (None where no shape is found)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_pixel = np.median(border, axis=0)
    background = _BG_NAMES[int(np.argmin(np.linalg.norm(_BG - bg_pixel, axis=1)))]
    mask = _majority(np.linalg.norm(rgb - bg_pixel, axis=-1) > _FOREGROUND_DISTANCE)
    if mask.sum() < 4:
        return {"shape": None, "color": None, "background": background}
    fg_pixel = np.median(rgb[mask], axis=0)
    color = _FG_NAMES[int(np.argmin(np.linalg.norm(_FG - fg_pixel, axis=1)))]
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    shape = "square" if fill >= _SQUARE_CUT else "circle" if fill >= _CIRCLE_CUT else "triangle"
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
