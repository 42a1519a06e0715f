"""A user source's latents and text embeddings, cached in shards as they are computed.

The one way through for a data set of any size (../shared/ARCHITECTURE.md, "Data at scale"):

    header scan (`SourceSet`) -> shard plan (bucket by bucket) -> this process's shards ->
    DataLoader workers decode and fit each image to its bucket (once) -> VAE batches sized by
    memory -> posterior mean and std (and the mirrored image's) -> one shard file at a time

Memory holds the batches in flight and one shard's rows, never the data set. The text encoder's
embeddings of the distinct captions go to shards the same way. Training then reads rows by
offset (`training.shards.RowTensor`). Each image's skip, wherever it is found, is appended to the
run's report as it happens and kept in its shard's metadata, so a resumed cache reports it too.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from ldm_pipeline.data.buckets import Bucket, fit_to_bucket
from ldm_pipeline.data.decode import SkippedImage, decode_image
from ldm_pipeline.data.prepare import decode_mask, mask_cell
from ldm_pipeline.data.sources import describe
from ldm_pipeline.errors import InputError, out_of_memory
from ldm_pipeline.files import write_atomically
from ldm_pipeline.tokenizer import token_ids

from .cache import content_hash, model_fingerprint
from .config import DataConfig
from .data import SourceSet, pick_captions
from .shards import (
    RowTensor,
    ShardFile,
    ShardPlan,
    cut,
    mine,
    open_finished,
    rows_per_shard,
    wait_for_shards,
    write_shard,
)

# Share of the free memory (RAM on the CPU, the GPU's on CUDA) the VAE encoder's batch may take.
_ENCODE_MEMORY_SHARE = 0.25
_MAX_ENCODE_BATCH = 64


def default_workers() -> int:
    """DataLoader workers for decoding: one core is left to the encoder (at most 8 workers)."""
    return min(8, max(1, (os.cpu_count() or 1) - 1))


def encoder_bytes_per_image(vae, bucket: Bucket) -> int:
    """A bound on the VAE encoder's working memory for one image of ``bucket`` (no gradients).

    The largest activation (``block_out_channels[i]`` at 1/2^i of the image) is live about six
    times at once in a resnet block (input, two norms, two convolutions, the residual sum), and
    the mid-block attention holds a tokens² score matrix. On the ``sd15`` preset at 512 px this
    gives 0.87 GB; the measured peak grows 0.64 GB per image (../shared/FINDINGS.md).
    """
    width, height = bucket
    channels = vae.config.block_out_channels
    largest = max(c * (width >> i) * (height >> i) for i, c in enumerate(channels))
    element = torch.empty((), dtype=vae.dtype).element_size()
    tokens = (width >> (len(channels) - 1)) * (height >> (len(channels) - 1))
    attention = tokens * tokens * 4 if getattr(vae.config, "mid_block_add_attention", True) else 0
    return 6 * largest * element + attention


def encode_batch_size(vae, bucket: Bucket, setting: int | None) -> int:
    """``data.encode_batch_size`` when set, else what a quarter of the free memory holds."""
    if setting is not None:
        return setting
    free = torch.cuda.mem_get_info()[0] if vae.device.type == "cuda" else psutil.virtual_memory().available
    per_image = encoder_bytes_per_image(vae, bucket)
    return int(min(_MAX_ENCODE_BATCH, max(1, _ENCODE_MEMORY_SHARE * free // per_image)))


@functools.cache
def _libc():
    """The C library, when it is glibc (``malloc_trim`` and ``mallopt``); None elsewhere (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "malloc_trim") else None


# glibc's mallopt parameter, and its values: allocations from this size on get their own
# mapping, returned to the system when freed; 32 MiB is where glibc's adaptive threshold stops.
_M_MMAP_THRESHOLD = -3
_CACHING_MMAP_THRESHOLD = 4 << 20
_DEFAULT_MMAP_THRESHOLD = 32 << 20


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def bounded_heap() -> Iterator[None]:
    """Caching without a creeping heap (glibc). The encoder's batches allocate and free tensors of
    a few to hundreds of megabytes; glibc's adaptive threshold puts those under 32 MiB on the heap,
    where the holes they leave between longer-lived allocations stay resident. Caching 5,000
    images at 512 px (small VAE, one core) the main process's floor rose by 0.06-0.13 GB (with
    ``malloc_trim`` after each shard alone too); with allocations of 4 MiB and more mapped on their
    own, it did not rise, and the peak fell from 3.10 GB to 2.82 (benchmarks/README.md, data_scale).
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _CACHING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
            return_freed_memory()


@dataclass
class RowToDecode:
    position: int  # index into the source set's usable rows
    row: int  # the dataset's row
    bucket: Bucket
    size: tuple[int, int]  # from the header, orientation applied

    @classmethod
    def of(cls, source: SourceSet, position: int) -> RowToDecode:
        return cls(position, source.found.rows[position], source.buckets[position], source.found.sizes[position])


class DecodedRows(torch.utils.data.Dataset):
    """Run in DataLoader workers: the usable row at a position decoded (a JPEG at the coarsest
    scale that covers its bucket) and fitted to its bucket, or the reason it cannot be. Random
    crops are drawn from the seed and the row, so any worker, process or resumed run draws the
    same one."""

    def __init__(self, source: SourceSet):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> dict:
        it = RowToDecode.of(self.source, position)
        return decode_row(self.source.ds[it.row], it, self.source.options)


def decode_row(item: dict, it: RowToDecode, o: dict) -> dict:
    """One source row decoded and fitted to its bucket: ``pixels`` (uint8 ``[3, H, W]``) and
    ``mask``, or ``skip``, the reason it cannot be used."""
    out = {"position": it.position, "name": describe(item["image"], it.row), "skip": None, "mask": None}
    scale = max(it.bucket[0] / it.size[0], it.bucket[1] / it.size[1])
    cover = (max(1, round(it.size[0] * scale)), max(1, round(it.size[1] * scale)))
    try:
        image = decode_image(item["image"], o["background"], o["max_pixels"], draft=cover)
        rng = random.Random(f"{o['seed']}/{it.row}")
        same = random.Random(f"{o['seed']}/{it.row}")
        out["pixels"] = torch.from_numpy(fit_to_bucket(image, it.bucket, o["crop"], rng).copy()).permute(2, 0, 1)
        cell = mask_cell(item) if o["masks"] else None
        if cell is not None:
            mask = decode_mask(cell, image.size, o["background"], o["max_pixels"])
            out["mask"] = torch.from_numpy(fit_to_bucket(mask, it.bucket, o["crop"], same).copy())[None]
    except SkippedImage as err:
        out["pixels"], out["skip"] = None, err.reason
    return out


@torch.no_grad()
def encode_samples(vae, samples: list[dict], flip: bool, masks: bool) -> dict[str, torch.Tensor]:
    """Decoded samples' VAE posterior in fp32 (``mean``, ``std``, with ``flip`` the mirrored
    images' ``*_flipped`` too) and with ``masks`` their loss masks averaged to the latent grid
    (0-255; all 255 where a sample has none)."""
    x = torch.stack([s["pixels"] for s in samples]).to(vae.device, vae.dtype) / 127.5 - 1.0
    out = {}
    with torch.autocast(vae.device.type, enabled=False):
        for suffix, batch in (("", x), ("_flipped", x.flip(-1))) if flip else (("", x),):
            dist = vae.encode(batch).latent_dist
            out["mean" + suffix], out["std" + suffix] = dist.mean.float().cpu(), dist.std.float().cpu()
    if masks:
        full = [s["mask"] if s["mask"] is not None else torch.full_like(s["pixels"][:1], 255) for s in samples]
        out["mask"] = F.interpolate(torch.stack(full).float(), size=out["mean"].shape[-2:], mode="area")
    return out


class _ShardBuilder:
    """The rows of the shard being written, encoded batch by batch."""

    def __init__(self, vae, flip: bool, masks: bool, batch_setting: int | None):
        self.vae, self.flip, self.masks, self.batch_setting = vae, flip, masks, batch_setting
        self.reset()

    def reset(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.skipped: list[dict] = []
        self.names: list[str] = []

    @torch.no_grad()
    def add(self, samples: list[dict], report) -> None:
        for s in samples:
            if s["skip"] is not None:
                self.skipped.append({"item": s["name"], "reason": s["skip"]})
                report(s["name"], s["skip"])
        good = [s for s in samples if s["pixels"] is not None]
        if not good:
            return
        try:
            out = encode_samples(self.vae, good, self.flip, self.masks)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            h, w = good[0]["pixels"].shape[-2:]
            raise InputError(
                f"out of memory encoding {len(good)} image(s) of {w}x{h} with the VAE; "
                f"set data.encode_batch_size to fewer (now {self.batch_setting or f'auto: {len(good)}'})"
            ) from err
        self._append("rows", torch.tensor([s["position"] for s in good]))
        self.names += [s["name"] for s in good]
        for name, value in out.items():
            self._append(name, value)

    def _append(self, name: str, value: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(value)

    def write(self, path: Path, bucket: Bucket) -> None:
        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        if "rows" not in tensors:  # every image of the shard was skipped
            tensors = {"rows": torch.zeros(0, dtype=torch.int64)}
        meta = {
            "bucket": f"{bucket[0]}x{bucket[1]}",
            "skipped": json.dumps(self.skipped),
            "names": json.dumps(self.names),
        }
        write_shard(path, tensors, meta)
        self.reset()
        del tensors
        return_freed_memory()


def _latent_plan(source: SourceSet, vae, flip: bool, shard_mb: float) -> list[tuple[Bucket, ShardPlan]]:
    """Each bucket's rows (in source order) cut into shards of at most ``shard_mb``."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    plans = []
    for bucket, positions in source.by_bucket().items():
        latent = vae.config.latent_channels * (bucket[0] // factor) * (bucket[1] // factor) * 4
        row = latent * (4 if flip else 2) + 8 + (latent // vae.config.latent_channels if source.options["masks"] else 0)
        per = rows_per_shard(row, shard_mb)
        plans += [(bucket, p) for p in cut(positions, per, f"{bucket[0]}x{bucket[1]}")]
    return plans


def _encode_shards(
    source: SourceSet, vae, todo: list[tuple[Bucket, ShardPlan]], folder: Path, cfg: DataConfig, report
) -> None:
    """Decode (in workers) and encode this process's unfinished shards, writing each when done."""
    batches, owner = [], []  # each encoder batch's positions; its shard and whether it ends it
    for k, (bucket, plan) in enumerate(todo):
        size = encode_batch_size(vae, bucket, cfg.encode_batch_size)
        starts = range(0, len(plan.positions), size)
        batches += [plan.positions[s : s + size] for s in starts]
        owner += [(k, s + size >= len(plan.positions)) for s in starts]
    total = sum(len(b) for b in batches)
    if not total:
        return
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    if isinstance(source.ds, datasets.IterableDataset):
        _encode_streamed(source, vae, todo, folder, cfg, report, batches, owner, workers)
        return
    loader = torch.utils.data.DataLoader(
        DecodedRows(source),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=list,
        prefetch_factor=2 if workers else None,
    )
    builder = _ShardBuilder(vae, cfg.random_flip, source.options["masks"], cfg.encode_batch_size)
    vae.eval()
    with tqdm(total=total, desc="cache latents", unit="img", smoothing=0.1) as bar:
        for (k, last), samples in zip(owner, loader, strict=True):
            builder.add(samples, report)
            bar.update(len(samples))
            if last:
                bucket, plan = todo[k]
                builder.write(folder / plan.name, bucket)


def _encode_streamed(source: SourceSet, vae, todo, folder: Path, cfg: DataConfig, report, batches, owner, workers):
    """`_encode_shards` for a stream (``data.streaming``): one more pass over it, in its order,
    decoding the rows of this process's unfinished shards in threads (Pillow releases the GIL).
    A shard's rows are a run of its bucket's rows, so shards fill one after another: memory holds
    about one shard per bucket, and the decodes in flight."""
    batch_of = {p: b for b, members in enumerate(batches) for p in members}
    wanted = {source.found.rows[p]: p for p in batch_of}
    decoded: dict[int, list[dict]] = {}
    builder = {
        k: _ShardBuilder(vae, cfg.random_flip, source.options["masks"], cfg.encode_batch_size) for k in range(len(todo))
    }
    vae.eval()

    def finish(position: int, sample: dict) -> None:
        b = batch_of[position]
        decoded.setdefault(b, []).append(sample)
        if len(decoded[b]) < len(batches[b]):
            return
        k, last = owner[b]
        builder[k].add(sorted(decoded.pop(b), key=lambda s: s["position"]), report)
        if last:
            bucket, plan = todo[k]
            builder.pop(k).write(folder / plan.name, bucket)

    pending: collections.deque = collections.deque()
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(total=len(batch_of), desc="cache latents", unit="img") as bar,
    ):
        for row, item in enumerate(source.ds):
            if row in wanted:
                p = wanted[row]
                pending.append((p, pool.submit(decode_row, item, RowToDecode.of(source, p), source.options)))
            while pending and (len(pending) > 4 * max(1, workers) or pending[0][1].done()):
                p, future = pending.popleft()
                finish(p, future.result())
                bar.update(1)
        for p, future in pending:
            finish(p, future.result())
            bar.update(1)
    if builder:
        raise InputError(
            f"data.source {cfg.source}: the stream ended before {len(builder)} shard(s) were filled; "
            "it must give the same rows on every pass"
        )


@dataclass
class LatentRows:
    """One bucket's cached images, read from shards by row: the posterior's ``latents`` (``mean``,
    ``std``, and ``*_flipped``), their captions and, with masks, the loss masks averaged to the
    latent grid (0-255)."""

    bucket: Bucket
    captions: list[list[str]]
    latents: dict[str, RowTensor]
    masks: RowTensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def pick_captions(self, index: torch.Tensor, generator: torch.Generator) -> list[str]:
        return pick_captions(self.captions, index, generator)


def _read_buckets(source: SourceSet, folder: Path, plans: list[tuple[Bucket, ShardPlan]]) -> tuple[list, list]:
    """Each bucket's rows from the finished shards, and every image skipped while decoding."""
    where: dict[Bucket, list[tuple[ShardFile, int]]] = {}
    positions: dict[Bucket, list[int]] = {}
    skipped = []
    for bucket, plan in plans:
        shard = ShardFile(folder / plan.name)
        rows = shard.tensor("rows").tolist()
        where.setdefault(bucket, []).extend((shard, r) for r in range(len(rows)))
        positions.setdefault(bucket, []).extend(rows)
        skipped += json.loads(shard.metadata.get("skipped", "[]"))
    buckets = []
    for bucket, places in where.items():
        if not places:
            continue
        names = [n for n in places[0][0].names() if n != "rows"]
        latents = {n: RowTensor(n, places) for n in names if n != "mask"}
        masks = RowTensor("mask", places) if "mask" in names else None
        captions = [source.found.captions[p] for p in positions[bucket]]
        buckets.append(LatentRows(bucket, captions, latents, masks))
    return buckets, skipped


def _write_index(source: SourceSet, folder: Path, plans: list[tuple[Bucket, ShardPlan]]) -> None:
    """``index.jsonl`` beside the shards: one line per cached image (image, bucket, captions,
    shard, row), streamed from the shards, for people and other tools; training reads the shards."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for bucket, plan in plans:
                shard = ShardFile(folder / plan.name)
                names = json.loads(shard.metadata.get("names", "[]"))
                for row, (position, name) in enumerate(zip(shard.tensor("rows").tolist(), names, strict=True)):
                    line = {"image": name, "bucket": f"{bucket[0]}x{bucket[1]}", "shard": plan.name, "row": row}
                    f.write(json.dumps({**line, "captions": source.found.captions[position]}) + "\n")

    write_atomically(folder / "index.jsonl", write)


def cached_source_latents(
    vae, source: SourceSet, cfg: DataConfig, cache_dir: Path, accelerator: Accelerator
) -> tuple[list[LatentRows], list[dict], float]:
    """The source's latents by bucket, cached in shards under ``cache_dir``, and the images that
    failed to decode. Each process encodes its share of the shards; all then read all of them.

    Keyed by the files (path, size and modification time, or the bytes' hash), the captions'
    rows, the VAE's weights and config and every setting that changes a latent.
    """
    parts = {
        "files": source.found.fingerprint,
        "buckets": content_hash([list(b) for b in source.buckets]),
        "vae": model_fingerprint(vae),
        **{k: source.options[k] for k in ("crop", "seed", "background", "masks")},
        "flip": cfg.random_flip,
        "shard_mb": cfg.shard_mb,
    }
    folder = Path(cache_dir) / f"latent-shards-{content_hash(parts)}"
    folder.mkdir(parents=True, exist_ok=True)
    plans = _latent_plan(source, vae, cfg.random_flip, cfg.shard_mb)
    start = time.monotonic()
    todo = [(b, p) for b, p in mine(plans, accelerator.process_index, accelerator.num_processes)]
    todo = [(b, p) for b, p in todo if open_finished(folder / p.name) is None]
    if accelerator.is_main_process:
        done = len(plans) - len(todo) if accelerator.num_processes == 1 else None
        kept = f", {done} finished shard(s) kept" if done else ""
        print(f"cache: {len(source)} images in {len(plans)} shard(s) under {folder}{kept}")
    with bounded_heap():
        _encode_shards(source, vae, todo, folder, cfg, source.report_skip)
    wait_for_shards(folder, [p for _, p in plans], "latent")
    buckets, skipped = _read_buckets(source, folder, plans)
    if accelerator.is_main_process:
        _write_index(source, folder, plans)
    return buckets, skipped, time.monotonic() - start


class TextRows:
    """Cached caption embeddings in shards of ``per`` rows, indexed by row: ``t[row]``."""

    def __init__(self, folder: Path, plans: list[ShardPlan], per: int):
        self.shards = [ShardFile(folder / p.name) for p in plans]
        self.per = per

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.shards[row // self.per].rows("embeds", [row % self.per])[0]


@torch.no_grad()
def cached_text_shards(
    text_encoder, tokenizer, captions: set[str], cache_dir: Path, shard_mb: float, accelerator: Accelerator
) -> tuple[TextRows, dict[str, int]]:
    """Embeddings of each distinct caption in shards, and each caption's row (``""`` is row 0).

    Keyed like `cached_source_latents` by the captions, the text encoder and the tokenizer's length.
    """
    unique = [""] + sorted(captions - {""})
    parts = {"texts": content_hash(unique), "text_encoder": model_fingerprint(text_encoder)}
    parts["max_length"] = tokenizer.model_max_length
    folder = Path(cache_dir) / f"text-shards-{content_hash(parts)}"
    row_bytes = tokenizer.model_max_length * text_encoder.config.hidden_size * 4
    per = rows_per_shard(row_bytes, shard_mb)
    plans = cut(list(range(len(unique))), per, "texts")
    text_encoder.eval()
    todo = [p for p in mine(plans, accelerator.process_index, accelerator.num_processes)]
    todo = [p for p in todo if open_finished(folder / p.name) is None]
    for plan in tqdm(todo, desc="cache text embeddings", unit="shard", disable=len(todo) < 2):
        chunks = []
        for start in range(0, len(plan.positions), 64):
            ids = token_ids(tokenizer, [unique[i] for i in plan.positions[start : start + 64]])
            chunks.append(text_encoder(ids.to(text_encoder.device))[0].float().cpu())
        write_shard(folder / plan.name, {"embeds": torch.cat(chunks)}, {})
    wait_for_shards(folder, plans, "text")
    return TextRows(folder, plans, per), {text: i for i, text in enumerate(unique)}
