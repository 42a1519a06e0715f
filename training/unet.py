"""Stage ``unet``: the conditional UNet on cached VAE latents and frozen text embeddings.

Each step draws z from the cached posterior, noises it to a uniformly drawn timestep of the
training schedule (DDPM forward process), and regresses the UNet's output on the target of the
configured prediction type. Captions are dropped to "" with probability ``caption_dropout`` so
that the one model also learns the unconditional score used by classifier-free guidance
(Ho & Salimans 2022). The EMA weights make the saved pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.images import image_grid
from ldm_pipeline.loading import load_component
from ldm_pipeline.pipeline import LatentDiffusionPipeline
from ldm_pipeline.presets import build_scheduler, build_unet, get_preset

from .cache import Pixels, cached_latents, cached_texts
from .config import RunConfig
from .loop import index_batches, log_images, make_optimizer, run_loop
from .objectives import (
    denoising_loss,
    min_snr_weights,
    offset_noise,
    perturbed_noise,
    prediction_target,
    sample_timesteps,
    zero_terminal_snr_config,
)


def _part(out: Path, name: str, pretrained: str | None, cls: type, stage: str):
    """A frozen component: from ``pretrained`` if set, else from the run folder's earlier stage."""
    if pretrained:
        return load_component(cls, pretrained, name)
    if not (out / name).is_dir():
        raise FileNotFoundError(f"{out / name} does not exist: run stage '{stage}' first or set {stage}.pretrained")
    return cls.from_pretrained(out / name)


def train_unet(cfg: RunConfig, train: Pixels, out: Path, accelerator: Accelerator) -> dict:
    """Train the UNet and save a complete pipeline folder to ``out/pipeline``."""
    c = cfg.unet
    preset = get_preset(cfg.model)
    vae = _part(out, "vae", cfg.vae.pretrained, AutoencoderKL, "vae").to(accelerator.device)
    text_encoder = _part(out, "text_encoder", cfg.clip.pretrained, CLIPTextModel, "clip").to(accelerator.device)
    tokenizer = _part(out, "tokenizer", cfg.clip.pretrained, CLIPTokenizer, "clip")

    cache_dir = cfg.data.cache_dir or out / "cache"
    cache_start = time.monotonic()
    with accelerator.main_process_first():  # the others then read what the main process wrote
        latents = cached_latents(vae, train, cache_dir, flip=cfg.data.random_flip)
        embeds, text_index = cached_texts(text_encoder, tokenizer, train.texts, cache_dir)
    cache_minutes = (time.monotonic() - cache_start) / 60
    scale = vae.config.scaling_factor

    unet = load_component(UNet2DConditionModel, c.pretrained, "unet") if c.pretrained else build_unet(preset)
    unet = unet.to(memory_format=torch.channels_last)
    if c.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # One noise schedule for training and sampling: the DDPM forward process is built from the
    # config of the scheduler the saved pipeline will sample with.
    schedule = {**preset.scheduler, **(zero_terminal_snr_config() if c.zero_terminal_snr else {})}
    sampler = build_scheduler(dataclasses.replace(preset, prediction_type=c.prediction_type, scheduler=schedule))
    noise_scheduler = DDPMScheduler.from_config(sampler.config)
    ema = EMAModel(unet.parameters(), decay=c.ema_decay)
    optimizer = make_optimizer(unet.parameters(), c)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    batches = index_batches(len(train), c.batch_size, cfg.seed + 2, accelerator)
    generator = torch.Generator().manual_seed(cfg.seed + 3 + accelerator.process_index)

    def compute_loss(step: int) -> dict[str, torch.Tensor]:
        index = next(batches)
        n = len(index)
        mean, std = latents["mean"][index], latents["std"][index]
        if cfg.data.random_flip:
            flip = (torch.rand(n, generator=generator) < 0.5).view(-1, 1, 1, 1)
            mean = torch.where(flip, latents["mean_flipped"][index], mean)
            std = torch.where(flip, latents["std_flipped"][index], std)
        z0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
        noise = offset_noise(torch.randn(z0.shape, generator=generator), c.noise_offset, generator)
        t = sample_timesteps(n, *c.timestep_range, generator=generator)
        keep = torch.rand(n, generator=generator) >= c.caption_dropout
        cond = embeds[torch.where(keep, text_index[index], 0)]
        noisy_input = perturbed_noise(noise, c.input_perturbation, generator)
        z0, noise, noisy_input, t, cond = (v.to(accelerator.device) for v in (z0, noise, noisy_input, t, cond))
        zt = noise_scheduler.add_noise(z0, noisy_input, t).contiguous(memory_format=torch.channels_last)
        pred = unet(zt, t, encoder_hidden_states=cond).sample.float()
        target = prediction_target(noise_scheduler, z0, noise, t, c.prediction_type)
        per_sample = denoising_loss(pred, target, c.loss, c.huber_delta)
        if c.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(noise_scheduler, t, c.min_snr_gamma, c.prediction_type)
        return {"loss": per_sample.mean()}

    @contextlib.contextmanager
    def ema_weights():
        """The unwrapped UNet with the EMA weights in place for the duration."""
        model = accelerator.unwrap_model(unet)
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        try:
            yield model
        finally:
            ema.restore(model.parameters())

    def snapshot(minutes: float) -> None:
        """Save the EMA weights as they stand, for adherence-against-minutes curves."""
        if not c.snapshot_every_minutes or int(minutes) % c.snapshot_every_minutes or not accelerator.is_main_process:
            return
        with ema_weights() as model:
            model.save_pretrained(out / "snapshots" / f"unet-{int(minutes):03d}min")

    def validate(step: int) -> dict[str, float]:
        """Every ``validation_every_steps``: the validation prompts, seeds 0..n-1, into a grid."""
        if not c.validation_every_steps or (step + 1) % c.validation_every_steps or not accelerator.is_main_process:
            return {}
        with ema_weights() as model, torch.no_grad():
            pipe = LatentDiffusionPipeline(vae, text_encoder, tokenizer, model, sampler)
            pipe.set_progress_bar_config(disable=True)
            seeds = [torch.Generator().manual_seed(i) for i in range(len(c.validation_prompts))]
            with accelerator.autocast():
                images = pipe(list(c.validation_prompts), generator=seeds).images
            model.train()
        (out / "validation").mkdir(exist_ok=True)
        image_grid(images, cols=min(4, len(images))).save(out / "validation" / f"unet-step{step + 1:06d}.png")
        log_images(accelerator, "validation", images, step + 1)
        return {}

    result = run_loop(
        accelerator, unet, optimizer, compute_loss, c, desc="unet", ema=ema, after_step=validate, on_minute=snapshot
    )
    unet = accelerator.unwrap_model(unet)
    ema.copy_to(unet.parameters())
    unet = unet.to(memory_format=torch.contiguous_format)
    metrics = {
        "steps": result.steps,
        "minutes": round(result.minutes, 2),
        "cache_minutes": round(cache_minutes, 3),
        "final_loss": result.final_loss,
    }
    if accelerator.is_main_process:
        pipe = LatentDiffusionPipeline(
            vae=vae.cpu(),
            text_encoder=text_encoder.cpu(),
            tokenizer=tokenizer,
            unet=unet.cpu(),
            scheduler=sampler,
        )
        pipe.save_pretrained(out / "pipeline")
        result.save(out / "logs" / "unet_losses.json")
    accelerator.wait_for_everyone()
    return metrics
