"""Named model presets: each defined once, built into diffusers and transformers models.

A preset fixes the architecture of the VAE, CLIP text encoder and UNet and the image resolution.
``build_pipeline(name)`` returns an untrained `LatentDiffusionPipeline`; the trainers start
from the same builders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from .errors import InputError
from .pipeline import LatentDiffusionPipeline
from .tokenizer import VOCAB_SIZE, load_clip_tokenizer


@dataclass(frozen=True)
class VAEPreset:
    """An `AutoencoderKL`; the latent is ``2 ** (len(channels) - 1)`` times smaller per side."""

    channels: tuple[int, ...]
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32


@dataclass(frozen=True)
class TextPreset:
    """A CLIP text tower (and, for the CLIP training stage, a matching vision tower)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_length: int = 77
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_patch_size: int = 8


@dataclass(frozen=True)
class UNetPreset:
    """A `UNet2DConditionModel`; cross-attention in every block marked True in ``attention``."""

    channels: tuple[int, ...]
    attention: tuple[bool, ...]
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    norm_num_groups: int = 32
    transformer_layers_per_block: int = 1


@dataclass(frozen=True)
class ModelPreset:
    """A whole text-to-image model: resolution and the three networks."""

    name: str
    resolution: int
    vae: VAEPreset
    text: TextPreset
    unet: UNetPreset
    prediction_type: str = "epsilon"
    description: str = ""
    scheduler: dict = field(default_factory=dict)


# Stable Diffusion's noise schedule: scaled-linear betas from 0.00085 to 0.012 over 1,000 steps.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# The CPU-sized networks of the from-zero presets (VAE factor 4, 6.7M-parameter UNet). Eight latent
# channels: at 32x32 the VAE learned shapes' corners faster than with four (held-out L1 at step
# 1,300: 0.026 vs 0.038; all-correct adherence of reconstructions 0.92 after 1,800 steps, 0.72 with
# four channels after 1,300).
_SMALL_VAE = VAEPreset(channels=(16, 32, 64), latent_channels=8, norm_num_groups=8)
_SMALL_TEXT = TextPreset(
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    projection_dim=128,
    vision_hidden_size=128,
    vision_layers=2,
)
_SMALL_UNET = UNetPreset(
    channels=(64, 128, 128), attention=(False, True, True), layers_per_block=1, attention_head_dim=8
)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="tiny",
            resolution=32,
            description="a small model that builds in well under a second, for tests",
            vae=VAEPreset(channels=(8, 16), latent_channels=4, norm_num_groups=4),
            text=TextPreset(
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                intermediate_size=64,
                max_length=16,
                projection_dim=32,
                vision_hidden_size=32,
                vision_layers=2,
                vision_patch_size=8,
            ),
            unet=UNetPreset(
                channels=(8, 16),
                attention=(False, True),
                layers_per_block=1,
                attention_head_dim=4,
                norm_num_groups=4,
            ),
        ),
        ModelPreset(
            name="shapes",
            resolution=32,
            description="32x32 model that the quick start trains from zero on a 2-core CPU",
            vae=_SMALL_VAE,
            text=dataclasses.replace(_SMALL_TEXT, max_length=24, vision_patch_size=8),
            unet=_SMALL_UNET,
        ),
        ModelPreset(
            name="digits",
            resolution=32,
            description="32x32 model for the built-in MNIST digits, trained from zero on a CPU",
            vae=_SMALL_VAE,
            text=dataclasses.replace(_SMALL_TEXT, max_length=16, vision_patch_size=4),
            unet=_SMALL_UNET,
        ),
        ModelPreset(
            name="sd15",
            resolution=512,
            description="the Stable Diffusion 1.x architecture (860M-parameter UNet, CLIP ViT-L/14 text)",
            vae=VAEPreset(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4),
            text=TextPreset(
                hidden_size=768,
                num_layers=12,
                num_heads=12,
                intermediate_size=3072,
                max_length=77,
                projection_dim=768,
                vision_hidden_size=1024,
                vision_layers=24,
                vision_patch_size=14,
            ),
            unet=UNetPreset(
                channels=(320, 640, 1280, 1280),
                attention=(True, True, True, False),
                layers_per_block=2,
                attention_head_dim=8,
            ),
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; a ``ValueError`` lists the known names otherwise."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def _as_preset(preset: str | ModelPreset) -> ModelPreset:
    return get_preset(preset) if isinstance(preset, str) else preset


def build_vae(preset: str | ModelPreset) -> AutoencoderKL:
    """An untrained VAE; ``scaling_factor`` stays 1.0 until training measures the latents' std."""
    p = _as_preset(preset)
    n = len(p.vae.channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=p.vae.channels,
        layers_per_block=p.vae.layers_per_block,
        latent_channels=p.vae.latent_channels,
        norm_num_groups=p.vae.norm_num_groups,
        sample_size=p.resolution,
        scaling_factor=1.0,
    )


def text_config(preset: str | ModelPreset) -> CLIPTextConfig:
    """The CLIP text-tower config of a preset (OpenAI CLIP's vocabulary and special ids)."""
    t = _as_preset(preset).text
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_length,
        projection_dim=t.projection_dim,
        hidden_act=t.hidden_act,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
    )


def vision_config(preset: str | ModelPreset) -> CLIPVisionConfig:
    """The CLIP vision-tower config used by the CLIP training stage and the evaluator."""
    p = _as_preset(preset)
    t = p.text
    return CLIPVisionConfig(
        hidden_size=t.vision_hidden_size,
        intermediate_size=4 * t.vision_hidden_size,
        num_hidden_layers=t.vision_layers,
        num_attention_heads=max(1, t.vision_hidden_size // 32),
        image_size=p.resolution,
        patch_size=t.vision_patch_size,
        projection_dim=t.projection_dim,
        hidden_act=t.hidden_act,
    )


def build_text_encoder(preset: str | ModelPreset) -> CLIPTextModel:
    """An untrained CLIP text encoder."""
    return CLIPTextModel(text_config(preset))


def build_unet(preset: str | ModelPreset) -> UNet2DConditionModel:
    """An untrained conditional UNet sized for the preset's latents and text encoder."""
    p = _as_preset(preset)
    u = p.unet
    factor = 2 ** (len(p.vae.channels) - 1)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention))
    return UNet2DConditionModel(
        sample_size=p.resolution // factor,
        in_channels=p.vae.latent_channels,
        out_channels=p.vae.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=u.channels,
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        cross_attention_dim=p.text.hidden_size,
        norm_num_groups=u.norm_num_groups,
        transformer_layers_per_block=u.transformer_layers_per_block,
    )


def build_scheduler(preset: str | ModelPreset) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on Stable Diffusion's noise schedule, for the preset's prediction type."""
    p = _as_preset(preset)
    config = {**SD_NOISE_SCHEDULE, **p.scheduler}
    return DPMSolverMultistepScheduler(
        **config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=p.prediction_type,
        # Stock StableDiffusionPipeline rewrites any other value (with a warning) on load.
        steps_offset=1,
    )


def build_pipeline(preset: str | ModelPreset) -> LatentDiffusionPipeline:
    """An untrained `LatentDiffusionPipeline` of the named preset (e.g. ``"tiny"``)."""
    p = _as_preset(preset)
    return LatentDiffusionPipeline(
        vae=build_vae(p),
        text_encoder=build_text_encoder(p),
        tokenizer=load_clip_tokenizer(p.text.max_length),
        unet=build_unet(p),
        scheduler=build_scheduler(p),
    )
