"""Stage ``unet``: the conditional UNet on cached VAE latents and frozen text embeddings.

Each step draws z from the cached posterior, noises it to a uniformly drawn timestep of the
training schedule (DDPM forward process), and regresses the UNet's output on the target of the
configured prediction type. Captions are dropped to "" with probability ``caption_dropout`` so
that the one model also learns the unconditional score used by classifier-free guidance
(Ho & Salimans 2022). The EMA weights make the saved pipeline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.loading import load_component
from ldm_pipeline.pipeline import LatentDiffusionPipeline
from ldm_pipeline.presets import build_scheduler, build_unet, get_preset

from .cache import Pixels, encode_latents, encode_texts
from .config import RunConfig
from .loop import index_batches, run_loop
from .objectives import min_snr_weights, prediction_target


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

    means, stds = encode_latents(vae, train)
    embeds, text_index = encode_texts(text_encoder, tokenizer, train.texts)
    scale = vae.config.scaling_factor

    unet = load_component(UNet2DConditionModel, c.pretrained, "unet") if c.pretrained else build_unet(preset)
    unet = unet.to(memory_format=torch.channels_last)
    # One noise schedule for training and sampling: the DDPM forward process is built from the
    # config of the scheduler the saved pipeline will sample with.
    sampler = build_scheduler(dataclasses.replace(preset, prediction_type=c.prediction_type))
    noise_scheduler = DDPMScheduler.from_config(sampler.config)
    ema = EMAModel(unet.parameters(), decay=c.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=c.learning_rate, weight_decay=0.0)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    batches = index_batches(len(train), c.batch_size, cfg.seed + 2, accelerator)
    generator = torch.Generator().manual_seed(cfg.seed + 3 + accelerator.process_index)
    steps_total = noise_scheduler.config.num_train_timesteps

    def compute_loss(step: int) -> dict[str, torch.Tensor]:
        index = next(batches)
        n = len(index)
        eps_z = torch.randn(means[index].shape, generator=generator)
        z0 = (means[index] + stds[index] * eps_z) * scale
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, steps_total, (n,), generator=generator)
        keep = torch.rand(n, generator=generator) >= c.caption_dropout
        cond = embeds[torch.where(keep, text_index[index], 0)]
        z0, noise, t, cond = (v.to(accelerator.device) for v in (z0, noise, t, cond))
        zt = noise_scheduler.add_noise(z0, noise, t).contiguous(memory_format=torch.channels_last)
        pred = unet(zt, t, encoder_hidden_states=cond).sample.float()
        target = prediction_target(noise_scheduler, z0, noise, t, c.prediction_type)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if c.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(noise_scheduler, t, c.min_snr_gamma, c.prediction_type)
        return {"loss": per_sample.mean()}

    def snapshot(minutes: float) -> None:
        """Save the EMA weights as they stand, for adherence-against-minutes curves."""
        if not c.snapshot_every_minutes or int(minutes) % c.snapshot_every_minutes or not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(unet)
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.save_pretrained(out / "snapshots" / f"unet-{int(minutes):03d}min")
        ema.restore(model.parameters())

    result = run_loop(
        accelerator,
        unet,
        optimizer,
        compute_loss,
        steps=c.steps,
        warmup_steps=c.warmup_steps,
        desc="unet",
        max_minutes=c.max_minutes,
        ema=ema,
        on_minute=snapshot,
    )
    unet = accelerator.unwrap_model(unet)
    ema.copy_to(unet.parameters())
    unet = unet.to(memory_format=torch.contiguous_format)
    metrics = {"steps": result.steps, "minutes": round(result.minutes, 2), "final_loss": result.final_loss}
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
