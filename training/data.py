"""Training images decoded once per run, grouped by aspect-ratio bucket, with their captions.

Built-in data (shapes, digits) is one square bucket. A user source (``data.source``) goes through
`ldm_pipeline.data`: `load_source`, robust decoding with a skip report written to the run
folder (``skipped_images.jsonl``), and buckets when ``data.bucketing`` is on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator

from ldm_pipeline.data import load_builtin
from ldm_pipeline.data.buckets import Bucket, make_buckets
from ldm_pipeline.data.prepare import Scan, assign_buckets, prepare_images, scan
from ldm_pipeline.data.sources import load_source
from ldm_pipeline.errors import InputError

from .config import DataConfig

SKIP_REPORT = "skipped_images.jsonl"


@dataclass
class Pixels:
    """Images of one shape as uint8 ``[N, 3, H, W]``, each with one or more captions, and with
    masks their uint8 ``[N, 1, H, W]`` loss masks (255: trained, 0: ignored)."""

    images: torch.Tensor
    captions: list[list[str]]
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.captions = [[c] if isinstance(c, str) else list(c) for c in self.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def float_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index`` as float in [-1, 1]."""
        return self.images[index].float() / 127.5 - 1.0

    def pick_captions(self, index: torch.Tensor, generator: torch.Generator) -> list[str]:
        return pick_captions(self.captions, index, generator)


def pick_captions(captions: list[list[str]], index: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One caption per image at ``index``, drawn at random where an image has several."""
    draws = torch.rand(len(index), generator=generator).tolist()
    return [captions[i][int(u * len(captions[i]))] for i, u in zip(index.tolist(), draws, strict=True)]


@dataclass
class ImageSet:
    """Training images as buckets of one shape each (built-in data: one bucket)."""

    buckets: list[Pixels]
    skipped: int = 0
    summary: str = ""
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Each bucket's (height, width)."""
        return [tuple(b.images.shape[-2:]) for b in self.buckets]

    def batches(self, batch_size: int, accumulation: int, seed: int, accelerator: Accelerator) -> BatchSampler:
        """Endless micro-batches: ``batch_size`` images per optimiser step over all processes,
        in ``accumulation`` draws; see `bucket_batches` and `Batch`.

        Raises:
            ValueError: ``batch_size`` does not split evenly over processes and micro-batches.
        """
        return micro_batches(self.buckets, batch_size, accumulation, seed, accelerator)


def micro_batches(
    buckets: list, batch_size: int, accumulation: int, seed: int, accelerator: Accelerator
) -> BatchSampler:
    """Endless micro-batches over ``buckets`` (anything with a length: `Pixels`, cached rows):
    ``batch_size`` images per optimiser step over all processes, in ``accumulation`` draws."""
    processes = accelerator.num_processes
    if batch_size % (accumulation * processes):
        raise InputError(
            f"batch_size {batch_size} (images per optimiser step) must be a multiple of "
            f"{processes} process(es) × {accumulation} accumulation step(s)"
        )
    return BatchSampler([len(b) for b in buckets], batch_size // accumulation, seed, accelerator, buckets)


@dataclass
class Batch:
    """One micro-batch: ``chunk`` holds its images' indices over all processes, ``index`` this
    process's share (``chunk[part]``). Random draws made for the whole chunk and then cut to
    ``part`` are the same whatever the number of processes."""

    pixels: Pixels
    index: torch.Tensor
    chunk: torch.Tensor
    part: slice


def bucket_batches(sizes: list[int], global_batch: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (bucket, indices) batches of ``global_batch`` images, each from one bucket.

    Each epoch permutes every bucket, cuts it into batches (the remainder waits for the next
    epoch's permutation) and visits them in random order. Every process draws the same sequence.
    """
    if min(sizes) < global_batch:
        raise InputError(f"a bucket has {min(sizes)} images, fewer than one batch over all processes ({global_batch})")
    generator = torch.Generator().manual_seed(seed)
    while True:
        chunks = []
        for bucket, n in enumerate(sizes):
            order = torch.randperm(n, generator=generator)
            chunks += [(bucket, order[s : s + global_batch]) for s in range(0, n - global_batch + 1, global_batch)]
        visit = torch.randperm(len(chunks), generator=generator).tolist() if len(sizes) > 1 else range(len(chunks))
        for k in visit:
            yield chunks[k]


class BatchSampler:
    """`bucket_batches` cut into each process's share, with a position that checkpoints save and
    resumes restore (mid-epoch)."""

    def __init__(self, sizes: list[int], global_batch: int, seed: int, accelerator: Accelerator, items: list):
        self._args = (sizes, global_batch, seed)
        share = global_batch // accelerator.num_processes
        self._part = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
        self._items = items
        self._reset()

    def _reset(self) -> None:
        self._batches = bucket_batches(*self._args)
        self.consumed = 0

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> Batch:
        bucket, chunk = next(self._batches)
        self.consumed += 1
        return Batch(self._items[bucket], chunk[self._part], chunk, self._part)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Replay the draws up to the saved position (index arithmetic only, no data)."""
        self._reset()
        for _ in range(state["consumed"]):
            next(self)


def _builtin(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    ds = load_builtin(cfg.name, num_samples=cfg.num_samples, seed=cfg.seed, resolution=cfg.resolution)
    if cfg.holdout >= len(ds):
        raise InputError(f"data.holdout ({cfg.holdout}) must be smaller than the dataset ({len(ds)} images)")
    arrays = np.stack([np.asarray(im.convert("RGB").resize((cfg.resolution,) * 2)) for im in ds["image"]])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    texts = list(ds["text"])
    cut = len(ds) - cfg.holdout
    train = ImageSet([Pixels(images[:cut], texts[:cut])], summary=f"{cut} images ({cfg.name})")
    return train, ImageSet([Pixels(images[cut:], texts[cut:])] if cfg.holdout else [])


def _group(prepared_groups: dict) -> list[Pixels]:
    """Prepared arrays as `Pixels`; a fourth channel is the loss mask."""
    groups = []
    for arrays, captions in prepared_groups.values():
        tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        masks = tensor[:, 3:].contiguous() if tensor.shape[1] == 4 else None
        groups.append(Pixels(tensor[:, :3].contiguous(), captions, masks))
    return groups


def _subset(found: Scan, keep: slice) -> Scan:
    return Scan(found.rows[keep], found.sizes[keep], found.captions[keep], [], len(found.rows[keep]), found.masked)


@dataclass
class SourceSet:
    """A user source as the UNet stage streams it: the dataset's rows (undecoded), what the header
    scan found, each usable row's bucket and the options that fit an image to it. Nothing is
    decoded here; `training.source_cache` decodes each image once, into the cache."""

    ds: datasets.Dataset
    found: Scan
    buckets: list[Bucket]
    options: dict
    summary: str
    report: Path | None = None

    def __len__(self) -> int:
        return len(self.found.rows)

    def by_bucket(self) -> dict[Bucket, list[int]]:
        """Each bucket's positions (indices of usable rows), in source order, buckets sorted."""
        groups: dict[Bucket, list[int]] = {}
        for position, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(position)
        return dict(sorted(groups.items()))

    def report_skip(self, item: str, reason: str) -> None:
        """Append an image skipped while caching to the run's skip report, as it happens."""
        if self.report is not None:
            with open(self.report, "a", encoding="utf-8") as f:
                f.write(json.dumps({"item": item, "reason": reason}) + "\n")

    def write_report(self, decoded: list[dict]) -> None:
        """The whole report once the cache is made: the header scan's skips, then every image
        that failed to decode (every process's, and those of shards an earlier run finished)."""
        if self.report is not None:
            self.found.write_report(self.report)
            with open(self.report, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"item": d["item"], "reason": d["reason"]}) + "\n" for d in decoded)


def _scanned(
    cfg: DataConfig,
    report_dir: Path | None,
    main_process: bool,
    masks: bool,
    default_caption: str | None,
    headers: bool,
) -> tuple[datasets.Dataset, Scan, str, str]:
    """The source's rows and their scan, with the skip report written and the skip share checked."""
    ds = load_source(cfg.source, cfg.caption_column, cfg.image_column, cfg.split, cfg.mask_column, cfg.streaming)
    if isinstance(ds, datasets.IterableDataset):
        if cfg.num_samples is not None:
            ds = ds.take(cfg.num_samples)
    elif cfg.num_samples is not None and cfg.num_samples < len(ds):
        ds = ds.select(range(cfg.num_samples))
    found = scan(ds, tuple(cfg.background), cfg.max_image_pixels, main_process, masks, default_caption, headers)
    where = ""
    if report_dir is not None and main_process:
        report_dir.mkdir(parents=True, exist_ok=True)
        found.write_report(report_dir / SKIP_REPORT)
        where = f"; skipped files and reasons in {report_dir / SKIP_REPORT}"
    summary = f"data {cfg.source}: {found.summary()}{where}"
    if main_process:
        print(summary)
    if not found.rows:
        raise InputError(f"data.source {cfg.source}: no usable image ({found.summary()}){where}")
    check_skipped(cfg, len(found.skipped), found.total, where)
    return ds, found, summary, where


def check_skipped(cfg: DataConfig, skipped: int, total: int, where: str = "") -> None:
    """Stop when more than ``data.max_skipped_fraction`` of the rows were skipped."""
    share = skipped / max(total, 1)
    if share > cfg.max_skipped_fraction:
        raise InputError(
            f"data.source {cfg.source}: {share:.1%} of the images were skipped, over data.max_skipped_fraction "
            f"{cfg.max_skipped_fraction:.1%}{where}"
        )


def _options(cfg: DataConfig, masks: bool) -> dict:
    return {
        "crop": cfg.crop,
        "seed": cfg.seed,
        "background": tuple(cfg.background),
        "max_pixels": cfg.max_image_pixels,
        "masks": masks,
    }


def load_source_set(
    cfg: DataConfig,
    step: int,
    min_bucket_size: int,
    report_dir: Path | None = None,
    main_process: bool = True,
    masks: bool = False,
    default_caption: str | None = None,
) -> SourceSet:
    """``data.source`` scanned from the files' headers and bucketed, nothing decoded: what the
    UNet stage caches (`training.source_cache`). Arguments as `load_images`.

    Raises:
        ValueError: no usable image, or more skipped than ``data.max_skipped_fraction``.
    """
    ds, found, summary, _ = _scanned(cfg, report_dir, main_process, masks, default_caption, headers=True)
    buckets = make_buckets(cfg.resolution, step, cfg.max_aspect) if cfg.bucketing else [(cfg.resolution,) * 2]
    chosen = assign_buckets(found.sizes, buckets, min_bucket_size)
    report = report_dir / SKIP_REPORT if report_dir is not None and main_process else None
    return SourceSet(ds, found, chosen, _options(cfg, masks), summary, report)


def load_images(
    cfg: DataConfig,
    step: int,
    min_bucket_size: int,
    report_dir: Path | None = None,
    main_process: bool = True,
    masks: bool = False,
    default_caption: str | None = None,
) -> tuple[ImageSet, ImageSet]:
    """The configured data as training and held-out `ImageSet` s, decoded into memory (the VAE and
    CLIP stages train on pixels; the UNet stage streams a source through `load_source_set`).

    Args:
        step: bucket sides are multiples of it (VAE factor × UNet down-sampling).
        min_bucket_size: one global batch; smaller buckets are folded into their neighbours.
        report_dir: where the skip report goes (the run folder).
        masks: load each image's loss mask (`ldm_pipeline.data.prepare.mask_cell`) into `Pixels.masks`.
        default_caption: the caption of images that have none (DreamBooth's instance prompt).

    Raises:
        ValueError: no usable image, or more skipped than ``data.max_skipped_fraction`` (the
            report is written first), or a holdout as large as the data.
    """
    if cfg.source is None:
        return _builtin(cfg)
    ds, found, summary, _ = _scanned(cfg, report_dir, main_process, masks, default_caption, headers=False)
    if cfg.holdout >= len(found.rows):
        raise InputError(f"data.holdout ({cfg.holdout}) must be smaller than the usable images ({len(found.rows)})")
    cut = len(found.rows) - cfg.holdout
    options = {**_options(cfg, masks), "bucketing": cfg.bucketing, "max_aspect": cfg.max_aspect}
    train = prepare_images(
        ds, cfg.resolution, step, min_bucket_size=min_bucket_size, scanned=_subset(found, slice(0, cut)), **options
    )
    buckets = ", ".join(f"{w}x{h}: {len(t)}" for (w, h), (_, t) in train.groups.items())
    train_set = ImageSet(_group(train.groups), len(found.skipped), summary, {"buckets": buckets})
    if not cfg.holdout:
        return train_set, ImageSet([])
    held = prepare_images(ds, cfg.resolution, step, scanned=_subset(found, slice(cut, None)), **options)
    return train_set, ImageSet(_group(held.groups))
