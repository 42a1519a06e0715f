"""``data.cache: none``: a source's latents encoded in the training loop, no cache made first.

For a run shorter than one pass over a huge set, caching every image costs more than it saves.
Here DataLoader workers decode the images of the batches training will draw next (the same
deterministic sequence as `training.data.bucket_batches`, started at the sampler's position, so
resume is exact), and the VAE encodes each batch when the step asks for it. Captions are encoded
in the loop too (`training.captions.CaptionEmbedder`). An image that fails to decode is reported
and replaced in its batch by another of the batch's images.
"""

from __future__ import annotations

import itertools

import torch

from ldm_pipeline.data.buckets import Bucket
from ldm_pipeline.errors import InputError

from .data import BatchSampler, SourceSet, bucket_batches, pick_captions
from .source_cache import DecodedRows, default_workers, encode_samples


class InLoopEncoder:
    """Prefetched, decoded batches of the training sequence, encoded when a step needs them."""

    def __init__(self, vae, source: SourceSet, flip: bool, workers: int | None, prefetch: int = 2):
        self.vae, self.source, self.flip = vae, source, flip
        self.workers = default_workers() if workers is None else workers
        self.prefetch = prefetch
        self.positions = source.by_bucket()
        self.order = list(self.positions)
        self.sampler: BatchSampler | None = None
        self._stream = None
        self._memo: tuple[tuple, dict] | None = None

    def buckets(self) -> list[InLoopRows]:
        return [
            InLoopRows(self, k, b, [self.source.found.captions[p] for p in self.positions[b]])
            for k, b in enumerate(self.order)
        ]

    def _batches(self, start: int):
        """The positions of this process's share of each micro-batch, from micro-batch ``start`` on."""
        sizes, global_batch, seed = self.sampler._args
        part = self.sampler._part
        sequence = itertools.islice(bucket_batches(sizes, global_batch, seed), start, None)
        return ([self.positions[self.order[k]][i] for i in chunk[part].tolist()] for k, chunk in sequence)

    def _next_decoded(self) -> list[dict]:
        if self._stream is None:
            loader = torch.utils.data.DataLoader(
                DecodedRows(self.source),
                batch_sampler=self._batches(self.sampler.consumed - 1),
                num_workers=self.workers,
                collate_fn=list,
                prefetch_factor=self.prefetch if self.workers else None,
            )
            self._stream = iter(loader)
        return next(self._stream)

    @torch.no_grad()
    def posterior(self, bucket: int, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The posterior of the bucket's images at ``index`` (this step's), encoded now."""
        key = (bucket, tuple(index.tolist()))
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        samples = self._next_decoded()
        wanted = [self.positions[self.order[bucket]][i] for i in key[1]]
        if [s["position"] for s in samples] != wanted:
            raise RuntimeError("in-loop encoding: the prefetched batch is not the one training drew")
        good = [s for s in samples if s["pixels"] is not None]
        for s in samples:
            if s["pixels"] is None:
                self.source.report_skip(s["name"], s["skip"])
                print(f"data: {s['name']} skipped ({s['skip']}); another image of its batch stands in")
        if not good:
            raise InputError(f"data: no image of a batch could be decoded: {[s['name'] for s in samples]}")
        filled = [s if s["pixels"] is not None else {**s, "pixels": good[0]["pixels"]} for s in samples]
        out = encode_samples(self.vae, filled, self.flip, self.source.options["masks"])
        self._memo = (key, out)
        return out


class _Column:
    """One posterior tensor of a bucket, indexed like a cached one: ``c[index]``."""

    def __init__(self, rows: InLoopRows, name: str, shape: tuple[int, ...]):
        self.rows, self.name, self.shape = rows, name, shape

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows.encoder.posterior(self.rows.number, index)[self.name]


class InLoopRows:
    """One bucket of a source encoded in the loop: the interface of the cached rows
    (`training.source_cache.LatentRows`), computed when a step reads them."""

    def __init__(self, encoder: InLoopEncoder, number: int, bucket: Bucket, captions: list[list[str]]):
        self.encoder, self.number, self.bucket, self.captions = encoder, number, bucket, captions
        vae = encoder.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (len(captions), vae.config.latent_channels, bucket[1] // factor, bucket[0] // factor)
        names = ["mean", "std"] + (["mean_flipped", "std_flipped"] if encoder.flip else [])
        self.latents = {n: _Column(self, n, shape) for n in names}
        self.masks = _Column(self, "mask", (shape[0], 1, *shape[2:])) if encoder.source.options["masks"] else None

    def __len__(self) -> int:
        return len(self.captions)

    def pick_captions(self, index: torch.Tensor, generator: torch.Generator) -> list[str]:
        return pick_captions(self.captions, index, generator)
