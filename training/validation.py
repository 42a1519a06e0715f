"""What the UNet stage shows while it trains, all from its EMA weights (the weights it will save):
validation grids of fixed prompts and seeds, EMA snapshots by the minute, and the pipeline the
quality check samples (training/quality.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ldm_pipeline.images import image_grid
from ldm_pipeline.pipeline import LatentDiffusionPipeline

from .config import UNetConfig
from .loop import log_images, trainable


class EMAViews:
    """The trained modules seen through their EMA weights, for the loop's hooks."""

    def __init__(self, model, ema: EMAModel, accelerator: Accelerator, parts: tuple, sampler, c: UNetConfig, out: Path):
        self.model, self.ema, self.accelerator = model, ema, accelerator
        self.vae, self.text_encoder, self.tokenizer = parts
        self.sampler, self.c, self.out = sampler, c, out

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

    def validation_grid(self, steps_done: int) -> None:
        """Every ``validation_every_steps``: the validation prompts at seeds 0..n-1, as one grid in
        ``<out>/validation/`` and in the trackers."""
        every = self.c.validation_every_steps
        if not every or steps_done % every or not self.accelerator.is_main_process:
            return
        prompts = list(self.c.validation_prompts)
        with self.weights() as inner, torch.no_grad():
            pipe = LatentDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, inner.unet, self.sampler)
            pipe.set_progress_bar_config(disable=True)
            seeds = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            with self.accelerator.autocast():
                images = pipe(prompts, generator=seeds).images
            inner.train()
        (self.out / "validation").mkdir(exist_ok=True)
        image_grid(images, cols=min(4, len(images))).save(self.out / "validation" / f"unet-step{steps_done:06d}.png")
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
