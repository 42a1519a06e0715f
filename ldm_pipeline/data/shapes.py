"""The built-in ``shapes`` dataset: one filled shape of a named colour on a named background.

Images are drawn with PIL at 4x and downsampled (anti-aliased edges), deterministic by seed.
Captions come from a small grammar with varied wording; the labels stay as columns so that
evaluation can check generated images against the prompt they came from.
"""

from __future__ import annotations

import random

import datasets
from PIL import Image, ImageDraw

from ..errors import InputError

SHAPES = ("circle", "square", "triangle")
# Well separated in RGB and from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 190),
    "cyan": (20, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a {color} {shape} against a {background} background",
    "{color} {shape}, {background} background",
    "a {background} background with a {color} {shape}",
    "a {shape} in {color} on {background}",
)
_SUPERSAMPLE = 4


def caption(shape: str, color: str, background: str, template: int = 0) -> str:
    """The caption for these labels in the given wording (an index into ``TEMPLATES``)."""
    return TEMPLATES[template].format(shape=shape, color=color, background=background)


def draw_shape(shape: str, color: str, background: str, size: int, x: int, y: int, resolution: int = 64) -> Image.Image:
    """Draw one shape with its bounding box's top-left corner at ``(x, y)`` and side ``size``."""
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (resolution * s, resolution * s), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    box = (x * s, y * s, (x + size) * s - 1, (y + size) * s - 1)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise InputError(f"unknown shape {shape!r}; known: {SHAPES}")
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def sample_labels(rng: random.Random) -> dict[str, str]:
    """Uniform random shape, colour, background and caption wording."""
    return {
        "shape": rng.choice(SHAPES),
        "color": rng.choice(list(COLORS)),
        "background": rng.choice(list(BACKGROUNDS)),
        "template": rng.randrange(len(TEMPLATES)),
    }


def make_shapes(
    num_samples: int, seed: int = 0, resolution: int = 64, min_size: int = 16, max_size: int = 40
) -> datasets.Dataset:
    """A ``datasets.Dataset`` of shapes with columns image, text, shape, color, background.

    Args:
        num_samples: number of images.
        seed: the same seed gives the same images and captions.
        resolution: image side in pixels; shape sizes scale with it from the 64-pixel ranges.
        min_size, max_size: shape side range at 64 pixels.
    """
    if num_samples <= 0:
        raise InputError(f"num_samples must be positive, got {num_samples}")
    if not 0 < min_size <= max_size <= 64:
        raise InputError(f"need 0 < min_size <= max_size <= 64, got {min_size}, {max_size}")
    rng = random.Random(seed)
    scale = resolution / 64
    rows: dict[str, list] = {k: [] for k in ("image", "text", "shape", "color", "background")}
    for _ in range(num_samples):
        labels = sample_labels(rng)
        size = round(rng.randint(min_size, max_size) * scale)
        x, y = rng.randint(0, resolution - size), rng.randint(0, resolution - size)
        rows["image"].append(draw_shape(labels["shape"], labels["color"], labels["background"], size, x, y, resolution))
        rows["text"].append(caption(labels["shape"], labels["color"], labels["background"], labels["template"]))
        for key in ("shape", "color", "background"):
            rows[key].append(labels[key])
    features = datasets.Features(
        image=datasets.Image(),
        text=datasets.Value("string"),
        shape=datasets.Value("string"),
        color=datasets.Value("string"),
        background=datasets.Value("string"),
    )
    return datasets.Dataset.from_dict(rows, features=features)
