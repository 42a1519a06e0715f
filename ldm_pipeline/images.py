"""Small image helpers shared by the CLI, the trainers and the benchmarks."""

from __future__ import annotations

import math

from diffusers.utils import make_image_grid
from PIL import Image


def image_grid(images: list[Image.Image], cols: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images row by row (``cols`` per row, default about square), padding with black.

    ``scale`` enlarges the grid by that whole factor (nearest neighbour: pixels stay sharp).
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size)
    grid = make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    return grid if scale == 1 else grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
