"""From a source's rows to training arrays: decode every image once, report what is skipped, bucket.

`scan` decodes each row (`decode_image`) and records its size or why it is unusable;
`prepare_images` then assigns buckets, folds buckets too small for one batch into their nearest
neighbour, and resizes and crops each image to its bucket. Nothing is dropped without a line in
the report: every skipped row is a `Skipped` with its path (or row number) and reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .buckets import Bucket, fit_to_bucket, make_buckets, nearest_bucket
from .decode import DEFAULT_MAX_PIXELS, SkippedImage, decode_image, probe_image
from .sources import captions_of, describe, mask_beside

NO_CAPTION = "no caption (empty, no .txt file, or not listed in the metadata file)"


@dataclass
class Skipped:
    """One row that training does not use, and why."""

    item: str
    reason: str


@dataclass
class Scan:
    """What decoding every row found: sizes and captions of the usable rows, the skipped ones."""

    rows: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    total: int = 0
    # With masks: how many usable images have a loss mask (the rest train on the whole image).
    masked: int = 0
    # SHA-256 over the usable rows' files (path, size, modification time; or the bytes' hash) and
    # masks, in order: what a cache of their encodings is keyed by (captions are not in it).
    fingerprint: str = ""

    def summary(self) -> str:
        """One line: how many rows are usable and why the others are not."""
        reasons = Counter(s.reason.split(":")[0] for s in self.skipped)
        why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        masks = f"; {self.masked} with a loss mask" if self.masked else ""
        return (
            f"{len(self.rows)} of {self.total} images usable, {len(self.skipped)} skipped"
            + (f" ({why})" if why else "")
            + masks
        )

    def write_report(self, path: str | Path) -> None:
        """Each skipped row as a JSON line ``{"item", "reason"}`` (an empty file when none)."""
        lines = [json.dumps({"item": s.item, "reason": s.reason}) for s in self.skipped]
        Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def mask_cell(item: dict) -> str | dict | None:
    """A row's loss mask: its ``mask`` cell (a named column), else ``<stem>_mask.png`` beside its image."""
    if item.get("mask"):
        return item["mask"]
    image = item["image"]
    if isinstance(image, dict) and image.get("member"):
        return None  # a tar member: masks come from a table's or dataset's column
    return mask_beside(image.get("path") if isinstance(image, dict) else image)


def _same_aspect(mask: tuple[int, int], image: tuple[int, int]) -> None:
    (w, h), (mw, mh) = image, mask
    if abs(mw * h - w * mh) > 0.01 * w * mh:
        raise SkippedImage(f"loss mask is {mw}x{mh}, the image {w}x{h} (another aspect ratio)")


def decode_mask(
    cell: str | dict, size: tuple[int, int], background: tuple[int, int, int], max_pixels: int
) -> Image.Image:
    """A loss mask as 8-bit greyscale at the image's ``size`` (white: trained, black: ignored).

    Raises:
        SkippedImage: the mask cannot be decoded, or its aspect ratio is not the image's.
    """
    try:
        mask = decode_image(cell, background, max_pixels).convert("L")
    except SkippedImage as err:
        raise SkippedImage(f"unusable loss mask: {err.reason}") from err
    if mask.size != size:
        _same_aspect(mask.size, size)
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def _probe_mask(cell: str | dict, size: tuple[int, int], max_pixels: int) -> None:
    """`decode_mask`'s checks that a header answers (the mask's own decode comes later)."""
    try:
        found = probe_image(cell, max_pixels)
    except SkippedImage as err:
        raise SkippedImage(f"unusable loss mask: {err.reason}") from err
    _same_aspect(found, size)


def scan(
    ds: datasets.Dataset,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    masks: bool = False,
    default_caption: str | None = None,
    headers_only: bool = False,
) -> Scan:
    """Decode every row of a `load_source` dataset; keep sizes of the usable ones.

    Args:
        masks: also decode each row's loss mask (`mask_cell`); a broken mask skips its row.
        default_caption: the caption of rows that have none (DreamBooth's instance prompt).
        headers_only: read each image's size from its header (`probe_image`) instead of decoding
            it: rows whose data is broken past the header are then found, and reported, when
            they are decoded for the cache.
    """
    result = Scan()
    digest = hashlib.sha256()
    what = "read image headers" if headers_only else "decode images"
    for row, item in enumerate(tqdm(ds, desc=what, unit="img", disable=not progress, leave=False)):
        result.total += 1
        name = describe(item["image"], row)
        if item.get("skip"):
            result.skipped.append(Skipped(name, item["skip"]))
            continue
        captions = captions_of(item["text"]) or captions_of(default_caption)
        if not captions:
            result.skipped.append(Skipped(name, NO_CAPTION))
            continue
        try:
            cell = mask_cell(item) if masks else None
            if headers_only:
                size = probe_image(item["image"], max_pixels)
                if cell is not None:
                    _probe_mask(cell, size, max_pixels)
            else:
                size = decode_image(item["image"], background, max_pixels).size
                if cell is not None:
                    decode_mask(cell, size, background, max_pixels)
        except SkippedImage as err:
            result.skipped.append(Skipped(name, err.reason))
            continue
        result.rows.append(row)
        result.sizes.append(size)
        result.captions.append(captions)
        result.masked += cell is not None
        identity = [file_identity(item["image"]), file_identity(cell) if cell else None]
        digest.update(json.dumps(identity).encode())
    result.fingerprint = digest.hexdigest()[:16]
    return result


def file_identity(cell: str | bytes | dict | None) -> str:
    """What names a file's content without reading it: path, size and modification time (or,
    for bytes held in a table or dataset, their hash)."""
    if isinstance(cell, dict) and cell.get("offset") is not None:  # a tar member
        return f"{file_identity(cell['path'])}@{cell['offset']}+{cell['size']}"
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, bytes):
        return "sha256:" + hashlib.sha256(cell).hexdigest()
    if cell is None:
        return "none"
    try:
        stat = os.stat(cell)
    except OSError:
        return f"{cell}:missing"
    return f"{os.path.abspath(cell)}:{stat.st_size}:{stat.st_mtime_ns}"


def assign_buckets(sizes: list[tuple[int, int]], buckets: list[Bucket], min_count: int) -> list[Bucket]:
    """Each image's bucket; a bucket with fewer than ``min_count`` images is folded into the
    nearest (by aspect ratio) one that has enough, so that every batch fills from one bucket."""
    chosen = [nearest_bucket(w, h, buckets) for w, h in sizes]
    counts = Counter(chosen)
    while len(counts) > 1 and min(counts.values()) < min_count:
        smallest = min(counts, key=lambda b: (counts[b], b))
        others = [b for b in counts if b != smallest]
        target = nearest_bucket(*smallest, others)
        chosen = [target if b == smallest else b for b in chosen]
        counts = Counter(chosen)
    return chosen


@dataclass
class Prepared:
    """Training images grouped by bucket: uint8 ``[N, H, W, 3]`` arrays (``[N, H, W, 4]`` with
    masks: the loss mask is the fourth channel) and their captions."""

    groups: dict[Bucket, tuple[np.ndarray, list[list[str]]]]
    scan: Scan


def prepare_images(
    ds: datasets.Dataset,
    resolution: int,
    step: int,
    *,
    bucketing: bool = False,
    max_aspect: float = 2.0,
    crop: str = "center",
    min_bucket_size: int = 1,
    seed: int = 0,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scanned: Scan | None = None,
    masks: bool = False,
) -> Prepared:
    """Decode, bucket (or square-crop, without ``bucketing``), resize and crop every usable image.

    Args:
        scanned: the `scan` of ``ds`` (or of a part of its rows) when already made.
        resolution: the square side; buckets have about its area.
        step: bucket sides are multiples of it (the VAE factor times the UNet's down-sampling).
        min_bucket_size: buckets smaller than this (one global batch) are folded into neighbours.
        crop: "center" or "random" (random offsets drawn once per image from ``seed``).
        masks: add each image's loss mask as a fourth channel, resized and cropped as its image
            (all 255 where an image has none).
    """
    found = scanned or scan(ds, background, max_pixels, masks=masks)
    buckets = make_buckets(resolution, step, max_aspect) if bucketing else [(resolution, resolution)]
    chosen = assign_buckets(found.sizes, buckets, min_bucket_size)
    rng = random.Random(seed)
    arrays: dict[Bucket, list[np.ndarray]] = {}
    texts: dict[Bucket, list[list[str]]] = {}
    for row, bucket, captions in zip(found.rows, chosen, found.captions, strict=True):
        item = ds[row]
        image = decode_image(item["image"], background, max_pixels)
        same_crop = random.Random()
        same_crop.setstate(rng.getstate())
        array = fit_to_bucket(image, bucket, crop, rng)
        if masks:
            cell = mask_cell(item)
            mask = decode_mask(cell, image.size, background, max_pixels) if cell else Image.new("L", image.size, 255)
            array = np.concatenate([array, fit_to_bucket(mask, bucket, crop, same_crop)[..., None]], axis=-1)
        arrays.setdefault(bucket, []).append(array)
        texts.setdefault(bucket, []).append(captions)
    groups = {b: (np.stack(arrays[b]), texts[b]) for b in sorted(arrays)}
    return Prepared(groups, found)
