"""Datasets as ``datasets.Dataset`` with columns ``image`` (PIL) and ``text``, plus labels."""

from __future__ import annotations

import datasets

from ..errors import InputError
from .digits import make_digits
from .emoji import make_emoji
from .shapes import make_shapes

BUILTIN = ("shapes", "digits", "emoji")


def load_builtin(name: str, num_samples: int | None = None, seed: int = 0, resolution: int = 64) -> datasets.Dataset:
    """A built-in dataset by name: ``shapes`` (procedural, any size), ``digits`` (5,000 MNIST) or
    ``emoji`` (OpenMoji, CC BY-SA 4.0: the 3,984 of its training split).

    Args:
        name: "shapes", "digits" or "emoji".
        num_samples: shapes: number of images (default 10,000); digits, emoji: N of them at random
            (default all).
        seed: drawing and caption seed.
        resolution: image side in pixels.
    """
    if name == "shapes":
        return make_shapes(num_samples or 10_000, seed=seed, resolution=resolution)
    if name in ("digits", "emoji"):
        # Both are stored in order (by label, by code point): shuffle so that any first N mix them.
        make = make_digits if name == "digits" else make_emoji
        ds = make(resolution=resolution, seed=seed).shuffle(seed=seed)
        return ds.select(range(min(num_samples, len(ds)))) if num_samples else ds.flatten_indices()
    raise InputError(f"unknown built-in dataset {name!r}; known: {BUILTIN}")


__all__ = ["BUILTIN", "load_builtin", "make_digits", "make_emoji", "make_shapes"]
