"""What the UNet stage shows while it trains, all from its EMA weights (the weights it will save):
validation grids of fixed prompts and seeds, EMA snapshots by the minute, and the pipeline the
quality check samples (training/quality.py).

When the stage fine-tunes a pretrained UNet, each validation image is a side-by-side: the top row
the model as it was before training (sampled once, kept in ``<out>/validation/base/`` so that a
resumed run shows the same row), the bottom row the current weights, same prompts and seeds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from PIL import Image

from ldm_pipeline.images import image_grid
from ldm_pipeline.pipeline import LatentDiffusionPipeline
from ldm_pipeline.schedulers import sampling_defaults

from .config import UNetConfig
from .loop import log_images, trainable


class EMAViews:
    """The trained modules seen through their EMA weights, for the loop's hooks."""

    def __init__(self, model, ema: EMAModel, accelerator: Accelerator, parts: tuple, sampler, c: UNetConfig, out: Path):
        self.model, self.ema, self.accelerator = model, ema, accelerator
        self.vae, self.text_encoder, self.tokenizer = parts
        self.sampler, self.c, self.out = sampler, c, out
        self.base: list[Image.Image] | None = None  # the row of the model before training (remember_base)

    @contextlib.contextmanager
    def weights(self) -> Iterator[torch.nn.Module]:
        """The unwrapped trained modules with the EMA weights in place for the duration."""
        inner = self.accelerator.unwrap_model(self.model)
        self.ema.store(trainable(inner))
        self.ema.copy_to(trainable(inner))
        try:
            yield inner
        finally:
            self.ema.restore(trainable(inner))

    def snapshot(self, minutes: float) -> None:
        """Every ``snapshot_every_minutes``: save the EMA UNet as it stands (adherence-against-minutes curves)."""
        every = self.c.snapshot_every_minutes
        if not every or int(minutes) % every or not self.accelerator.is_main_process:
            return
        with self.weights() as inner:
            inner.unet.save_pretrained(self.out / "snapshots" / f"unet-{int(minutes):03d}min")

    def _sample_prompts(self, unet) -> list[Image.Image]:
        prompts = list(self.c.validation_prompts)
        pipe = LatentDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, unet, self.sampler)
        pipe.set_progress_bar_config(disable=True)
        seeds = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        with torch.no_grad(), self.accelerator.autocast():
            return pipe(prompts, generator=seeds, **sampling_defaults(pipe)).images

    def remember_base(self) -> None:
        """Sample the validation prompts with the weights as loaded, before any step (or read the
        row an interrupted run of this folder sampled), for the side-by-sides."""
        if not self.c.validation_every_steps or not self.accelerator.is_main_process:
            return
        folder = self.out / "validation" / "base"
        paths = [folder / f"{i:02d}.png" for i in range(len(self.c.validation_prompts))]
        if all(p.is_file() for p in paths):
            self.base = [Image.open(p).convert("RGB") for p in paths]
            return
        with self.weights() as inner:
            self.base = self._sample_prompts(inner.unet)
            inner.train()
        folder.mkdir(parents=True, exist_ok=True)
        for image, path in zip(self.base, paths, strict=True):
            image.save(path)

    def validation_grid(self, steps_done: int) -> None:
        """Every ``validation_every_steps``: the validation prompts at seeds 0..n-1, as one image in
        ``<out>/validation/`` (a side-by-side under the base model's row when fine-tuning) and in
        the trackers."""
        every = self.c.validation_every_steps
        if not every or steps_done % every or not self.accelerator.is_main_process:
            return
        with self.weights() as inner:
            images = self._sample_prompts(inner.unet)
            inner.train()
        (self.out / "validation").mkdir(exist_ok=True)
        if self.base is not None:
            grid = image_grid(self.base + images, cols=len(images))
        else:
            grid = image_grid(images, cols=min(4, len(images)))
        grid.save(self.out / "validation" / f"unet-step{steps_done:06d}.png")
        log_images(self.accelerator, "validation", images, steps_done)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[LatentDiffusionPipeline]:
        """The pipeline the stage would save now (EMA weights, a fresh sampler), for the quality check."""
        with self.weights() as inner, torch.no_grad():
            inner.eval()
            fresh = type(self.sampler).from_config(self.sampler.config)
            pipe = LatentDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, inner.unet, fresh)
            pipe.set_progress_bar_config(disable=True)
            yield pipe
