"""Typed run configs: YAML in, validated dataclasses out, with errors that name the key.

The dataclass defaults are the shapes quick-start recipe; a YAML file states only what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm_pipeline.errors import InputError
from ldm_pipeline.loading import ModelLoadError, load_component_config
from ldm_pipeline.presets import PRESETS, SD_NOISE_SCHEDULE, get_preset
from ldm_pipeline.yaml_io import YAMLSyntaxError, parse_yaml, read_yaml

from ..configs import shipped
from .repa import BLOCK_PATTERN
from .seeds import MAX_SEED

STAGES = ("vae", "clip", "unet")
# Why an adapter type is refused (diffusers 0.42; tests/test_adapters.py re-checks it).
UNLOADABLE_ADAPTERS = {
    kind: "is not supported: diffusers' StableDiffusionPipeline.load_lora_weights refuses peft's "
    f"{name} weights ({key}...: 'Invalid LoRA checkpoint. Make sure all LoRA param names contain "
    "'lora' substring'), so the result would not load where diffusers runs; use adapter: lora "
    "(optionally with use_dora: true)"
    for kind, name, key in (("loha", "LoHa", "hada_w1_a"), ("lokr", "LoKr", "lokr_w1"))
}
# Built-in datasets whose prompts have a measured adherence (unet.eval_every, unet.target).
ADHERENCE = ("shapes", "digits", "emoji")


class ConfigError(InputError):
    """A config that cannot run; the message names the key and the problem."""


@dataclass
class DataConfig:
    """Which images and captions to train on."""

    # A built-in dataset (shapes, digits, emoji), used when ``source`` is not set.
    name: Literal["shapes", "digits", "emoji"] = "shapes"
    # Your images: an imagefolder with metadata.jsonl/csv, a folder of images with .txt captions,
    # a CSV/JSONL/Parquet of paths and captions, a save_to_disk folder or a Hub dataset id.
    source: str | None = None
    caption_column: str | None = None
    image_column: str | None = None
    # A table's or dataset's column of loss masks (unet.masked_loss); in a folder, cat_mask.png
    # beside cat.png is cat.png's mask.
    mask_column: str | None = None
    split: str = "train"
    # Built-in: images drawn (None: 20,000 shapes, all 5,000 digits, 3,984 emoji); source: the first N rows
    # (None: all of them).
    num_samples: int | None = None
    # None: the model preset's (or the pretrained UNet's) resolution.
    resolution: int | None = None
    seed: int = 0
    # Images held out for the VAE's PSNR; None: 256 for built-in data, 0 for a source.
    holdout: int | None = None
    # Aspect-ratio buckets of about resolution² pixels (each batch from one bucket); off: square.
    bucketing: bool = False
    max_aspect: float = 2.0
    # Crop to the bucket: center, or random (drawn once per image: the latent cache keeps it).
    crop: Literal["center", "random"] = "center"
    # Train the UNet on horizontally flipped images half the time (both latents are cached).
    random_flip: bool = False
    # RGB that transparent images are composited on.
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # Unreadable images are skipped and reported; the run stops when more than this share is.
    max_skipped_fraction: float = 0.1
    # Images above this many pixels are skipped (decompression bombs).
    max_image_pixels: int = 64_000_000
    # Where latents and text embeddings are cached (keyed by fingerprints); None: <output>/cache.
    cache_dir: str | None = None
    # Read data.source as a stream (datasets' IterableDataset: a Hub dataset or an imagefolder),
    # nothing downloaded or converted whole; the UNet stage's cache is made from it.
    streaming: bool = False
    # disk: a source's latents and caption embeddings are cached before the UNet trains; none:
    # encoded in the loop from prefetching workers (for a run shorter than one pass over the set).
    cache: Literal["disk", "none"] = "disk"
    # A source's cache is written in safetensors shards of at most this many MiB, as they are
    # encoded: a killed run keeps its finished shards, and each process writes its share.
    shard_mb: float = 64.0
    # DataLoader worker processes that decode and resize a source's images for the cache;
    # None: the cores less one (at most 8); 0: decode in the training process.
    num_workers: int | None = None
    # Images per VAE encoder batch while caching; None: what a quarter of the free memory holds
    # for this VAE and bucket (RAM on the CPU, the GPU's own on CUDA), at most 64.
    encode_batch_size: int | None = None


# diffusers.optimization.get_scheduler's names (piecewise_constant needs rules a config lacks).
# warmup_stable_decay: training/loop.py's own, for stages whose length is not known in advance.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "warmup_stable_decay",
)


@dataclass
class StageConfig:
    """What every stage has: where its model comes from and how the shared loop optimises it."""

    # A Hub id or local folder to load instead of training (the VAE, CLIP or UNet stage's part).
    pretrained: str | None = None
    # With max_minutes set, the loop fits the LR schedule to the steps that fit in that time
    # (at most ``steps``); ``steps: null`` then means as many as fit.
    steps: int | None = 1300
    # Images per optimiser step over all processes and accumulation micro-batches: the same
    # training at any world size (it must divide by processes × gradient_accumulation_steps).
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    lr_scheduler: str = "cosine"
    # warmup_stable_decay: the linear decay lasts this share of the steps before it (when the
    # stage's quality reaches its decay_at), or begins when a ceiling is this share of the steps
    # run away, and ends at lr_floor × learning_rate.
    decay_fraction: float = 0.25
    lr_floor: float = 0.1
    # adamw: torch's AdamW with its fused kernel where the device has one; adamw8bit: bitsandbytes.
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = 0.0
    # Micro-batches of batch_size per optimiser step.
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_minutes: float | None = None
    # Save the whole training state every this many steps (and at the end) to
    # <output>/checkpoints/<stage>/, keeping the newest checkpoint_keep; None: only at the end.
    checkpoint_every: int | None = 1000
    checkpoint_keep: int = 2
    # Steps with a non-finite loss or gradient are skipped; more than this many in a row stop the run.
    max_nonfinite_steps: int = 5


@dataclass
class VAEConfig(StageConfig):
    """Stage ``vae``: an AutoencoderKL trained with L1/L2 + KL (+ optional PatchGAN)."""

    learning_rate: float = 2e-3
    lr_scheduler: str = "warmup_stable_decay"
    # Train on random crops of this side (the VAE is convolutional): fewer pixels per step at
    # large resolutions. None trains on whole images.
    crop_size: int | None = 32
    # L2, not L1: with L1 the shapes VAE sat at the background's median (17-18 dB) for its first
    # ~600 steps; with L2 it reached 30 dB in 1,000 steps, where L1 took 2,000 (benchmarks/README.md).
    loss: Literal["l1", "l2"] = "l2"
    kl_weight: float = 1e-6
    # Starting the encoder's log-variance low keeps sampling noise from swamping early latents.
    logvar_init: float = -6.0
    # After training, fold each latent channel's measured mean and std into the VAE's 1×1 quant
    # convs so that every channel has zero mean and one std (images decode as before). On the
    # shapes VAE the channels' std ranged 0.46-3.5 and their means -2.4 to 3.0; standardised, the
    # UNet learned faster (benchmarks/README.md).
    standardise_latents: bool = True
    gan_start_step: int | None = None
    gan_weight: float = 0.5
    # Held-out reconstruction PSNR (dB) at which the stage is done: measured every eval_every
    # steps, it stops the stage when reached; else the stage runs to steps / max_minutes.
    target: float | None = None
    eval_every: int | None = None
    # With lr_scheduler warmup_stable_decay: the measured quality at which the LR decay begins
    # (None: only when a ceiling comes near).
    decay_at: float | None = None


@dataclass
class ClipConfig(StageConfig):
    """Stage ``clip``: a small CLIPModel trained contrastively; its text tower conditions the UNet."""

    steps: int | None = 150
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1


@dataclass
class DreamBoothConfig:
    """Subject fine-tuning from a few images (Ruiz et al. 2023, DreamBooth): every image of
    ``data.source`` without a caption of its own is captioned ``instance_prompt``; with
    ``class_prompt``, class images the model being tuned draws of that prompt (generated once,
    cached, reused) are mixed into every step with the prior-preservation loss (section 3.3)."""

    instance_prompt: str = ""
    # None: no prior preservation. A list: the class images are drawn in turn from each prompt
    # (e.g. the prompts a model must keep, not only the subject's class), each image captioned by its own.
    class_prompt: str | list[str] | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    # What the prior loss regresses onto. "noise": the class images' noise, as in the paper.
    # "model": the untuned UNet's own prediction at the same noisy latents (distillation), for the
    # class images under their captions plus the subject's images under the first class prompt,
    # the two terms summed: training on the model's own samples and on the subject under the class
    # prompt then cannot move the class away from what the model did (benchmarks/README.md: on the
    # quick-start model 2 points of adherence lost instead of 15). One more UNet in memory and
    # about twice the step time; not with train_text_encoder.
    prior_target: Literal["noise", "model"] = "noise"
    # Your own class images, topped up with generated ones to num_class_images; None: generated
    # into <data.cache_dir>/class-images-<fingerprint of the model, prompt and sampling>.
    class_data_dir: str | None = None
    # How the class images are sampled (the pipeline's guidance_scale default when None).
    class_sampling_steps: int = 25
    class_guidance_scale: float | None = None

    @property
    def class_prompts(self) -> list[str]:
        """The class prompts as a list: one for a single ``class_prompt``, none without it."""
        prompt = self.class_prompt
        return [] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2022, LoRA) through peft instead of training all weights."""

    rank: int = 8
    # None: equal to rank (scale 1).
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # Used with unet.train_text_encoder.
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    dropout: float = 0.0
    # DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): a trained magnitude
    # per output channel beside the low-rank direction; saved so that load_lora_weights reads it.
    use_dora: bool = False
    # "lora" only: diffusers' Stable Diffusion load_lora_weights refuses peft's LoHa and LoKr
    # weights (UNLOADABLE_ADAPTERS; tests/test_adapters.py checks that it still does).
    adapter: Literal["lora", "loha", "lokr"] = "lora"


@dataclass
class DistillConfig:
    """Latent consistency distillation of the pretrained UNet, the teacher (Luo et al. 2023, LCM,
    arXiv 2310.04378; training/consistency.py). With ``unet.lora`` the student is LoRA adapters on
    the teacher (LCM-LoRA, arXiv 2311.05556: no guidance input, its own target); without, a full
    UNet with a guidance-scale embedding (``time_cond_proj_dim``), pulled onto an EMA target.
    Either samples in 2-8 steps with diffusers' LCMScheduler and no guidance batch."""

    # N: the teacher's DDIM steps over the training schedule; each step skips T / N timesteps.
    teacher_steps: int = 50
    # The teacher's classifier-free guidance scale s (LCM's w = s - 1), drawn uniformly from
    # [low, high] each sample; None: the teacher pipeline's default guidance scale, both ends.
    guidance_scale: list[float] | None = None
    loss: Literal["huber", "l2"] = "huber"
    # Pseudo-Huber's c (diffusers' LCM example: 0.001).
    huber_c: float = 0.001
    # The full student's target network: an EMA of the student with this decay (LCM: 0.95).
    target_ema: float = 0.95
    # Width of the full student's guidance-scale embedding (its UNet's time_cond_proj_dim).
    guidance_embedding_dim: int = 256


@dataclass
class RepaConfig:
    """Representation alignment (REPA, arXiv 2410.06940; for UNets U-REPA, arXiv 2503.18414;
    training/repa.py): a projector from a UNet block's features of the noisy latents onto a
    frozen CLIP image tower's patch features of the clean image, its cosine loss added to the
    denoising loss. Training only: the saved pipeline is unchanged."""

    # The CLIP model whose image tower is aligned to: None, the run's own clip stage
    # (<output>/clip); else a folder or Hub id holding a CLIPModel.
    encoder: str | None = None
    # Its hidden state whose patch tokens are the target (-1: the last layer's).
    layer: int = -1
    # The UNet block whose output is aligned: down_blocks.N, mid_block (U-REPA's choice) or up_blocks.N.
    block: str = "mid_block"
    # The alignment loss's weight λ beside the denoising loss (REPA: 0.5).
    weight: float = 0.5
    # Width of the projector's hidden layers.
    projector_dim: int = 256


@dataclass
class UNetConfig(StageConfig):
    """Stage ``unet``: the conditional UNet on cached latents and text embeddings (training/objectives.py)."""

    batch_size: int = 64
    warmup_steps: int = 200
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    # Which noise sample noises which latent (training/objectives.py): "none" (i.i.d., DDPM),
    # "batch" (immiscible diffusion, arXiv 2406.12303: the batch's noise matched to its latents by
    # least total distance; with several processes, within each process's share) or "knn" (its
    # k-nearest variant, arXiv 2505.18521: the nearest of noise_candidates draws per latent).
    noise_assignment: Literal["none", "batch", "knn"] = "none"
    noise_candidates: int = 4
    # Zero terminal SNR (needs v_prediction); the saved sampler gets the same schedule.
    zero_terminal_snr: bool = False
    # Train on timesteps in [low, high) of the 1,000-step schedule.
    timestep_range: list[int] = field(default_factory=lambda: [0, 1000])
    # How timesteps are drawn in that range: "uniform" (DDPM) or "logit_normal" (sigmoid of a
    # normal with timestep_logit_mean and timestep_logit_std: more steps mid-schedule, as SD3).
    timestep_density: Literal["uniform", "logit_normal"] = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = 0.1
    caption_dropout: float = 0.1
    # Weight the loss by each image's mask (data.mask_column, or <name>_mask.png beside the
    # image; white: trained, black: ignored), averaged to the latent grid; no mask: all trained.
    masked_loss: bool = False
    # Tag-style captions ("a, b, c"): shuffle the tags after the first keep_tokens, and drop each
    # of those with probability tag_dropout (training/captions.py; varied captions are encoded in
    # the loop, the written ones come from the cache).
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    # The EMA's ceiling: diffusers' EMAModel warms its decay up as (1 + step) / (10 + step), so the
    # EMA averages over about the last ninth of the steps run (250 at step 2,250) until 0.999.
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    # UNet weights and inputs in channels-last layout. "auto": on CUDA only; on the CPU measured
    # it slowed training (benchmarks/README.md, train_throughput section).
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    # "auto": attention over short sequences in fp32 on the CPU, where PyTorch's bf16 flash kernel
    # is slow (training/attention.py); "sdpa": diffusers' default processor everywhere.
    attention: Literal["auto", "sdpa"] = "auto"
    # Also train the text encoder (its embeddings are then computed each step, not cached).
    train_text_encoder: bool = False
    # Train LoRA adapters (saved to <output>/lora, loadable by pipe.load_lora_weights) instead of
    # all the UNet's (and text encoder's) weights.
    lora: LoRAConfig | None = None
    # DreamBooth: an instance prompt for your subject's images and optional prior preservation.
    dreambooth: DreamBoothConfig | None = None
    # Distil the pretrained UNet into a latent consistency model (few-step sampling).
    distill: DistillConfig | None = None
    # Align a UNet block's features with a frozen image encoder's (REPA); None: off.
    repa: RepaConfig | None = None
    # Save the EMA UNet every this many minutes of training (for adherence-vs-time curves).
    snapshot_every_minutes: int | None = None
    # Every this many steps, sample these prompts (fixed seeds, EMA weights) into
    # <output>/validation/ and the trackers.
    validation_every_steps: int | None = None
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a red circle on a white background", "a blue square on a black background"]
    )
    # Prompt adherence of the EMA weights at which the stage is done (built-in shapes: all-correct;
    # digits: digit accuracy; emoji: CLIP R-precision), measured every eval_every steps on quality_prompts fixed prompts
    # (shapes: each shape × colour × background once per 54) sampled with the saved pipeline's
    # defaults, averaged over the last two measurements; else the stage runs to steps / max_minutes.
    target: float | None = None
    eval_every: int | None = None
    # Built-in emoji: target is the R-precision, and this the target of the skin tone drawn for the
    # held-out (emoji, tone) pairs, measured beside it; the stage is done when both are reached.
    held_out_target: float | None = None
    # With lr_scheduler warmup_stable_decay: the measured quality at which the LR decay begins
    # (None: only when a ceiling comes near).
    decay_at: float | None = None
    quality_prompts: int = 54


@dataclass
class RunConfig:
    """A whole run: the model preset, the data and each stage."""

    model: str = "shapes"
    # A pipeline folder or Hub id to fine-tune (a Stable Diffusion 1.x folder, or one of ours):
    # its VAE, text encoder, tokenizer, UNet and noise schedule, unless a stage names its own.
    pretrained: str | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    # Load pretrained weights from pickle files (.bin/.ckpt) too; off: safetensors only
    # (unpickling can run code from the file).
    allow_pickle: bool = False
    seed: int = 0
    # "auto": bf16 where the hardware runs it fast (see ldm_pipeline.training.hardware), else fp32.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Upload the result (pipeline/ or lora/) with a model card to this Hub repository (USER/NAME)
    # when training ends; the token comes from HF_TOKEN or `hf auth login`.
    push_to_hub: str | None = None
    hub_private: bool = False
    # Loss curves and validation images to TensorBoard (<output>/logs) or wandb (if installed).
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as false: take it back as the string where that is an option.
        if value is False and "no" in typing.get_args(hint):
            value = "no"
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: must be {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    return value


def _kind(data: Any) -> str:
    """How an error names a YAML value that should have been a mapping."""
    return "an empty list" if data == [] else f"a {type(data).__name__} ({str(data)[:40]!r})"


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key{hint}; known keys: {sorted(hints)}")
        kwargs[key] = _check_type(value, hints[key], path)
    return cls(**kwargs)


def _positive(cfg: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{name}: must be positive, got {value}")


@dataclass(frozen=True)
class Geometry:
    """How the models shrink an image: the VAE's factor, the UNet's down-sampling, native size."""

    vae_factor: int
    unet_factor: int
    resolution: int

    @property
    def bucket_step(self) -> int:
        """Image sides must be multiples of this for the latent to pass the UNet."""
        return self.vae_factor * self.unet_factor


def geometry(cfg: RunConfig) -> Geometry:
    """The geometry of the run's models: the preset's, or read from pretrained parts' configs."""
    preset = get_preset(cfg.model)
    vae_blocks, unet_blocks = len(preset.vae.channels), len(preset.unet.channels)
    resolution = preset.resolution
    try:
        if cfg.vae.pretrained:
            vae_blocks = len(load_component_config(AutoencoderKL, cfg.vae.pretrained, "vae")["block_out_channels"])
        if cfg.unet.pretrained:
            unet = load_component_config(UNet2DConditionModel, cfg.unet.pretrained, "unet")
            unet_blocks = len(unet["block_out_channels"])
            resolution = unet["sample_size"] * 2 ** (vae_blocks - 1)
    except ModelLoadError as err:
        raise ConfigError(f"pretrained: {err}") from err
    return Geometry(2 ** (vae_blocks - 1), 2 ** (unet_blocks - 1), resolution)


def check(cfg: RunConfig) -> RunConfig:
    """Check values that are impossible alone or together, reading nothing from disk or the Hub (the
    checks that need the models' geometry are `resolve`'s); return the config unchanged."""
    if cfg.model not in PRESETS:
        raise ConfigError(f"model: unknown preset {cfg.model!r}; known: {sorted(PRESETS)}")
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: unknown stage {stage!r}; stages are {list(STAGES)}")
    _positive(cfg.data, "data", ("num_samples", "resolution"))
    d = cfg.data
    for key, seed in (("seed", cfg.seed), ("data.seed", d.seed)):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{key}: must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed}")
    if d.holdout is not None and d.holdout < 0:
        raise ConfigError(f"data.holdout: must be >= 0, got {d.holdout}")
    if d.max_aspect < 1:
        raise ConfigError(f"data.max_aspect: must be >= 1, got {d.max_aspect}")
    if not 0 <= d.max_skipped_fraction <= 1:
        raise ConfigError(f"data.max_skipped_fraction: must be in [0, 1], got {d.max_skipped_fraction}")
    if len(d.background) != 3 or not all(0 <= v <= 255 for v in d.background):
        raise ConfigError(f"data.background: must be three values in 0..255, got {d.background}")
    _positive(d, "data", ("max_image_pixels", "shard_mb", "encode_batch_size"))
    if d.cache == "none" and d.source is None:
        raise ConfigError("data.cache: none encodes a data.source in the loop; built-in data is cached in memory")
    if d.streaming and d.source is None:
        raise ConfigError("data.streaming: needs a data.source to stream")
    if d.streaming and d.cache == "none":
        raise ConfigError(
            "data.cache: none draws batches at random, which a stream cannot; cache it (data.cache: disk)"
        )
    if d.streaming and (set(cfg.stages) & {"vae", "clip"}):
        raise ConfigError(
            "data.streaming: the vae and clip stages train on images in memory; stream only for stages: [unet]"
        )
    if d.num_workers is not None and d.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if d.source is not None and not d.source.strip():
        raise ConfigError("data.source: must not be empty")
    if cfg.unet.lora is not None:
        lora = cfg.unet.lora
        _positive(lora, "unet.lora", ("rank", "alpha"))
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"unet.lora.dropout: must be in [0, 1), got {lora.dropout}")
        if not lora.target_modules:
            raise ConfigError("unet.lora.target_modules: must name at least one module")
        if lora.adapter != "lora":
            raise ConfigError(f"unet.lora.adapter: {lora.adapter} {UNLOADABLE_ADAPTERS[lora.adapter]}")
    for name in STAGES:
        stage = getattr(cfg, name)
        _positive(
            stage,
            name,
            (
                "steps",
                "batch_size",
                "learning_rate",
                "max_minutes",
                "gradient_accumulation_steps",
                "max_grad_norm",
                "checkpoint_every",
                "checkpoint_keep",
            ),
        )
        if stage.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"{name}.lr_scheduler: must be one of {list(LR_SCHEDULERS)}, got {stage.lr_scheduler!r}")
        if stage.weight_decay < 0:
            raise ConfigError(f"{name}.weight_decay: must be >= 0, got {stage.weight_decay}")
        if stage.max_nonfinite_steps < 0:
            raise ConfigError(f"{name}.max_nonfinite_steps: must be >= 0, got {stage.max_nonfinite_steps}")
        if stage.warmup_steps < 0:
            raise ConfigError(f"{name}.warmup_steps: must be >= 0, got {stage.warmup_steps}")
        if not 0 < stage.decay_fraction <= 1:
            raise ConfigError(f"{name}.decay_fraction: must be in (0, 1], got {stage.decay_fraction}")
        if not 0 <= stage.lr_floor < 1:
            raise ConfigError(f"{name}.lr_floor: must be in [0, 1), got {stage.lr_floor}")
        if stage.steps is None and stage.max_minutes is None:
            raise ConfigError(f"{name}.steps: null (as many as fit) needs {name}.max_minutes")
    _positive(cfg.unet, "unet", ("min_snr_gamma", "snapshot_every_minutes", "validation_every_steps", "huber_delta"))
    _check_targets(cfg)
    if not 0 <= cfg.unet.caption_dropout < 1:
        raise ConfigError(f"unet.caption_dropout: must be in [0, 1), got {cfg.unet.caption_dropout}")
    _check_dreambooth(cfg)
    _check_distill(cfg)
    _check_repa(cfg)
    if not 0 <= cfg.unet.tag_dropout < 1:
        raise ConfigError(f"unet.tag_dropout: must be in [0, 1), got {cfg.unet.tag_dropout}")
    if cfg.unet.keep_tokens < 0:
        raise ConfigError(f"unet.keep_tokens: must be >= 0, got {cfg.unet.keep_tokens}")
    if cfg.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.push_to_hub):
        raise ConfigError(f"push_to_hub: must be a Hub repository id USER/NAME, got {cfg.push_to_hub!r}")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise ConfigError(f"report_to: {cfg.report_to} is not installed; pip install {cfg.report_to} or use 'none'")
    u = cfg.unet
    if u.zero_terminal_snr and u.prediction_type != "v_prediction":
        raise ConfigError("unet.zero_terminal_snr: needs unet.prediction_type v_prediction (ε is unlearnable at SNR 0)")
    timesteps = SD_NOISE_SCHEDULE["num_train_timesteps"]
    if len(u.timestep_range) != 2 or not 0 <= u.timestep_range[0] < u.timestep_range[1] <= timesteps:
        raise ConfigError(f"unet.timestep_range: must be [low, high] with 0 <= low < high <= {timesteps}")
    if u.timestep_logit_std <= 0:
        raise ConfigError(f"unet.timestep_logit_std: must be > 0, got {u.timestep_logit_std}")
    if u.noise_candidates < 2:
        raise ConfigError(
            f"unet.noise_candidates: must be at least 2 (noise draws per latent), got {u.noise_candidates}"
        )
    for key in ("noise_offset", "input_perturbation"):
        if getattr(u, key) < 0:
            raise ConfigError(f"unet.{key}: must be >= 0, got {getattr(u, key)}")
    if not 0 < cfg.unet.ema_decay < 1:
        raise ConfigError(f"unet.ema_decay: must be in (0, 1), got {cfg.unet.ema_decay}")
    _positive(cfg.vae, "vae", ("crop_size",))
    if cfg.vae.kl_weight < 0:
        raise ConfigError(f"vae.kl_weight: must be >= 0, got {cfg.vae.kl_weight}")
    return cfg


def _check_repa(cfg: RunConfig) -> None:
    r = cfg.unet.repa
    if r is None:
        return
    if cfg.unet.distill is not None:
        raise ConfigError("unet.repa: not with unet.distill (the consistency loss has no alignment term)")
    if cfg.data.source is not None:
        raise ConfigError(
            "unet.repa: needs the training images in memory (a built-in dataset); a data.source is streamed "
            "into the latent cache, which holds no encoder features yet"
        )
    if not re.fullmatch(BLOCK_PATTERN, r.block):
        raise ConfigError(f"unet.repa.block: must be down_blocks.N, mid_block or up_blocks.N, got {r.block!r}")
    if r.weight <= 0:
        raise ConfigError(f"unet.repa.weight: must be > 0, got {r.weight}")
    if r.projector_dim <= 0:
        raise ConfigError(f"unet.repa.projector_dim: must be > 0, got {r.projector_dim}")
    if r.encoder is None and (cfg.clip.pretrained or cfg.pretrained):
        raise ConfigError(
            "unet.repa.encoder: this run trains no CLIP model of its own (clip.pretrained is set); "
            "name a CLIP model folder or Hub id to align to"
        )


def _check_distill(cfg: RunConfig) -> None:
    d = cfg.unet.distill
    if d is None:
        return
    if not (cfg.unet.pretrained or cfg.pretrained):
        raise ConfigError("unet.distill: distils a trained model; set pretrained (a pipeline folder or Hub id)")
    if cfg.unet.dreambooth is not None or cfg.unet.train_text_encoder:
        raise ConfigError("unet.distill: not with unet.dreambooth or unet.train_text_encoder")
    if not 1 <= d.teacher_steps <= 1000:
        raise ConfigError(f"unet.distill.teacher_steps: must be in 1..1000, got {d.teacher_steps}")
    scales = d.guidance_scale
    if scales is not None and (len(scales) != 2 or not 1 <= scales[0] <= scales[1]):
        raise ConfigError(f"unet.distill.guidance_scale: must be [low, high] with 1 <= low <= high, got {scales}")
    if not 0 <= d.target_ema < 1:
        raise ConfigError(f"unet.distill.target_ema: must be in [0, 1), got {d.target_ema}")
    if d.huber_c <= 0:
        raise ConfigError(f"unet.distill.huber_c: must be > 0, got {d.huber_c}")
    if d.guidance_embedding_dim <= 0 or d.guidance_embedding_dim % 2:
        raise ConfigError(
            f"unet.distill.guidance_embedding_dim: must be a positive even number, got {d.guidance_embedding_dim}"
        )


def _check_dreambooth(cfg: RunConfig) -> None:
    db = cfg.unet.dreambooth
    if cfg.unet.masked_loss and cfg.data.source is None:
        raise ConfigError("unet.masked_loss: needs data.source (masks come with your images; built-in data has none)")
    if db is None:
        return
    if not db.instance_prompt.strip():
        raise ConfigError("unet.dreambooth.instance_prompt: must name your subject, e.g. 'a photo of sks dog'")
    if cfg.data.source is None:
        raise ConfigError("unet.dreambooth: needs data.source, the folder of your subject's images")
    if cfg.pretrained is None and cfg.unet.pretrained is None:
        raise ConfigError("unet.dreambooth: fine-tunes a trained model; set pretrained (a pipeline folder or Hub id)")
    prompts = db.class_prompts
    if db.class_prompt is not None and (not prompts or not all(p.strip() for p in prompts)):
        raise ConfigError("unet.dreambooth.class_prompt: empty; leave it out for no prior preservation")
    if db.num_class_images < 1 or db.class_sampling_steps < 1:
        raise ConfigError("unet.dreambooth: num_class_images and class_sampling_steps must be >= 1")
    if db.prior_loss_weight < 0:
        raise ConfigError(f"unet.dreambooth.prior_loss_weight: must be >= 0, got {db.prior_loss_weight}")
    if db.prior_target == "model" and db.class_prompt is None:
        raise ConfigError("unet.dreambooth.prior_target: model needs class_prompt (it preserves the class prompts)")
    if db.prior_target == "model" and cfg.unet.train_text_encoder:
        raise ConfigError(
            "unet.dreambooth.prior_target: model needs train_text_encoder false (the untuned UNet's "
            "predictions are taken on the frozen text encoder's embeddings)"
        )


def _holdout(d: DataConfig) -> int:
    """Held-out images: as set, else 256 of a built-in dataset and none of the user's own data."""
    return d.holdout if d.holdout is not None else 256 if d.source is None else 0


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill in what the config leaves to the run, on a checked config: each stage's pretrained
    folder from ``pretrained``, the data's defaults, and ``data.resolution`` from the models'
    geometry (read from the pretrained parts' configs on disk or the Hub); then the checks that
    need that geometry. Returns the config, changed in place."""
    if cfg.pretrained is not None:
        for name in STAGES:
            stage = getattr(cfg, name)
            if stage.pretrained is None:
                stage.pretrained = cfg.pretrained
    d = cfg.data
    if d.num_samples is None and d.source is None and d.name == "shapes":
        d.num_samples = 20_000
    d.holdout = _holdout(d)
    shape = geometry(cfg)
    if d.resolution is None:
        d.resolution = shape.resolution
    if d.resolution % shape.bucket_step:
        raise ConfigError(
            f"data.resolution: {d.resolution} is not a positive multiple of {shape.bucket_step} "
            f"(VAE factor {shape.vae_factor} × UNet down-sampling {shape.unet_factor})"
        )
    crop = cfg.vae.crop_size
    if crop is not None and (crop > d.resolution or crop % shape.vae_factor):
        raise ConfigError(
            f"vae.crop_size: {crop} must be a positive multiple of the VAE factor {shape.vae_factor} "
            f"no larger than data.resolution {d.resolution}"
        )
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    """`check`, then `resolve`: the config a run trains with."""
    return resolve(check(cfg))


def _check_targets(cfg: RunConfig) -> None:
    """A quality target needs something to measure, and a measurement interval."""
    _positive(cfg.vae, "vae", ("eval_every",))
    _positive(cfg.unet, "unet", ("eval_every", "quality_prompts"))
    for name in ("vae", "unet"):
        stage = getattr(cfg, name)
        for key in ("target", "decay_at"):
            if getattr(stage, key) is not None and stage.eval_every is None:
                raise ConfigError(f"{name}.{key}: needs {name}.eval_every (steps between measurements)")
        if stage.decay_at is not None and stage.lr_scheduler != "warmup_stable_decay":
            raise ConfigError(f"{name}.decay_at: needs {name}.lr_scheduler: warmup_stable_decay")
    if cfg.vae.eval_every is not None and _holdout(cfg.data) == 0:
        raise ConfigError("vae.eval_every: the PSNR is measured on held-out images: set data.holdout > 0")
    if cfg.unet.eval_every is not None and (cfg.data.source is not None or cfg.data.name not in ADHERENCE):
        raise ConfigError(
            f"unet.eval_every: adherence is measured for the built-in datasets {list(ADHERENCE)}, "
            f"not {'data.source' if cfg.data.source is not None else cfg.data.name}"
        )
    u = cfg.unet
    for key in ("target", "held_out_target"):
        if getattr(u, key) is not None and not 0 < getattr(u, key) <= 1:
            raise ConfigError(f"unet.{key}: adherence is a fraction in (0, 1], got {getattr(u, key)}")
    if u.held_out_target is not None and (cfg.data.name != "emoji" or u.target is None):
        raise ConfigError("unet.held_out_target: the held-out skin tone of the built-in emoji; needs unet.target too")
    if u.eval_every is not None and cfg.data.name == "emoji" and (cfg.clip.pretrained or cfg.pretrained):
        raise ConfigError("unet.eval_every: the emoji are judged by the run's own CLIP model; not with clip.pretrained")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. unet.steps=100")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node[part] = dict(child)
            node = node[part]
        try:
            node[parts[-1]] = parse_yaml(text, f"override {item!r}")
        except YAMLSyntaxError as err:
            raise ConfigError(str(err)) from err
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None, *, resolved: bool = True) -> RunConfig:
    """Build a `RunConfig` from a (possibly partial) nested dict and check it; ``resolved``: also
    `resolve` it (defaults, pretrained geometry), else it is checked only, touching no file or Hub."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"a run config must be a mapping of keys (model:, data:, unet: ...), got {_kind(data)}")
    cfg = check(_from_dict(RunConfig, apply_overrides(data or {}, overrides or []), ""))
    return resolve(cfg) if resolved else cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: the defaults), apply overrides, validate. A bare name that is
    not a file here (``shapes.yaml``, ``emoji``) names a shipped config (``ldm_pipeline.configs``)."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and len(path.parts) == 1:
            with contextlib.suppress(FileNotFoundError):
                path = shipped(path.name if path.suffix else f"{path.name}.yaml")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = read_yaml(path)
        except YAMLSyntaxError as err:
            raise ConfigError(str(err)) from err
        if data is not None and not isinstance(data, dict):
            raise ConfigError(
                f"{path}: a run config must be a mapping of keys (model:, data:, unet: ...), got {_kind(data)}"
            )
    return config_from_dict(data, overrides)


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data, for writing next to a run's outputs."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
