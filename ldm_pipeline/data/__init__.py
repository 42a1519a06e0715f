"""Datasets as ``datasets.Dataset`` with columns ``image`` (PIL) and ``text``, plus labels."""

from __future__ import annotations

import datasets

from .digits import make_digits
from .shapes import make_shapes

BUILTIN = ("shapes", "digits")


def load_builtin(name: str, num_samples: int | None = None, seed: int = 0, resolution: int = 64) -> datasets.Dataset:
    """A built-in dataset by name: ``shapes`` (procedural, any size) or ``digits`` (5,000 MNIST).

    Args:
        name: "shapes" or "digits".
        num_samples: shapes: number of images (default 10,000); digits: N of them at random (default all).
        seed: drawing and caption seed.
        resolution: image side in pixels.
    """
    if name == "shapes":
        return make_shapes(num_samples or 10_000, seed=seed, resolution=resolution)
    if name == "digits":
        # The file is sorted by label: shuffle so that any first N hold every digit.
        ds = make_digits(resolution=resolution, seed=seed).shuffle(seed=seed)
        return ds.select(range(min(num_samples, len(ds)))) if num_samples else ds.flatten_indices()
    raise ValueError(f"unknown built-in dataset {name!r}; known: {BUILTIN}")


__all__ = ["BUILTIN", "load_builtin", "make_digits", "make_shapes"]
