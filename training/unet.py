"""Stage ``unet``: the conditional UNet on cached VAE latents and frozen text embeddings.

Each step draws z from the cached posterior, noises it to a uniformly drawn timestep of the
training schedule (DDPM forward process), and regresses the UNet's output on the target of the
configured prediction type. Captions are dropped to "" with probability ``caption_dropout`` so
that the one model also learns the unconditional score used by classifier-free guidance
(Ho & Salimans 2022). The EMA weights make the saved pipeline.

Fine-tuning: with ``unet.pretrained`` (or the run's ``pretrained``) the UNet and the noise
schedule come from that model; ``unet.train_text_encoder`` trains the text encoder too (its
embeddings are then computed each step); ``unet.lora`` trains peft LoRA adapters instead of
the weights and saves them where ``pipe.load_lora_weights`` reads them.

Where to find each part: `build_caches` (latents and text embeddings, once), `DenoisingLoss`
(one step's loss), `trained_modules` (what trains; LoRA set-up in training/lora.py),
`sampling_scheduler` (the noise schedule), validation grids, snapshots and the quality check's
pipeline in training/validation.py, `train_unet` (the stage, end to end).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.errors import InputError
from ldm_pipeline.loading import load_component
from ldm_pipeline.pipeline import LatentDiffusionPipeline
from ldm_pipeline.presets import build_scheduler, build_unet, get_preset
from ldm_pipeline.tokenizer import token_ids

from .attention import use_cpu_attention
from .cache import cached_latents, cached_texts
from .captions import CaptionEmbedder, vary_caption
from .checkpoint import GeneratorState
from .config import RunConfig
from .data import Batch, ImageSet, SourceSet, check_skipped, micro_batches
from .distill import ConsistencyLoss, lcm_scheduler, lcm_student, lcm_target
from .dreambooth import class_images
from .in_loop import InLoopEncoder
from .loop import (
    check_finite,
    make_optimizer,
    run_loop,
    stage_checkpoints,
    trainable,
    zero3_init_disabled,
)
from .lora import add_lora, save_lora
from .objectives import (
    denoising_loss,
    immiscible_noise,
    min_snr_weights,
    nearest_noise,
    offset_noise,
    perturbed_noise,
    prediction_target,
    sample_timesteps,
    zero_terminal_snr_config,
)
from .quality import adherence_check, emoji_check
from .repa import FeatureTap, Projector, alignment_loss, cached_features, load_encoder, square_grid
from .seeds import seed_of
from .source_cache import TextRows, cached_source_latents, cached_text_shards
from .validation import EMAViews

# The scheduler config keys that define the forward process and the model's target (the rest
# are solver settings).
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "timestep_spacing",
    "rescale_betas_zero_snr",
    "prediction_type",
)


def _part(out: Path, name: str, pretrained: str | None, cls: type, stage: str, allow_pickle: bool):
    """A frozen component: from ``pretrained`` if set, else from the run folder's earlier stage."""
    if pretrained:
        return load_component(cls, pretrained, name, allow_pickle)
    if not (out / name).is_dir():
        raise InputError(f"{out / name} does not exist: run stage '{stage}' first or set {stage}.pretrained")
    return load_component(cls, str(out), name)


def pretrained_schedule(source: str | None) -> dict:
    """The forward-process settings (and prediction type) of a pretrained pipeline's scheduler ({} when it has none)."""
    if not source:
        return {}
    if os.path.isdir(source):
        folder = os.path.join(source, "scheduler")
        if not os.path.isdir(folder):
            return {}  # a bare UNet folder: the preset's schedule
        config = DDPMScheduler.load_config(folder)
    else:
        try:
            config = DDPMScheduler.load_config(source, subfolder="scheduler")
        except OSError:
            return {}
    return {k: config[k] for k in _SCHEDULE_KEYS if config.get(k) is not None}


class Denoiser(torch.nn.Module):
    """The trained modules as one (for Accelerate): the UNet, and the text encoder when trained."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel | None,
        projector: Projector | None = None,
        block: str | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        # With unet.repa: the projector of the aligned block's features (training only).
        self.projector = projector
        self.tap = FeatureTap(unet, block) if projector is not None else None

    def forward(
        self,
        zt: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The UNet's output; ``cond`` is embeddings, or token ids when the text encoder trains;
        ``timestep_cond`` an LCM student's guidance-scale embedding. With ``grid`` (REPA) also
        the aligned block's features projected onto that patch grid, ``[N, patches, width]``."""
        if self.text_encoder is not None:
            cond = self.text_encoder(cond)[0]
        sample = self.unet(zt, t, encoder_hidden_states=cond, timestep_cond=timestep_cond).sample
        if grid is None:
            return sample
        return sample, self.projector(self.tap.take(), grid)


def frozen_parts(cfg: RunConfig, out: Path) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The VAE, text encoder and tokenizer: pretrained ones, or the run folder's earlier stages'."""
    pickle = cfg.allow_pickle
    with zero3_init_disabled():
        vae = _part(out, "vae", cfg.vae.pretrained, AutoencoderKL, "vae", pickle)
        text_encoder = _part(out, "text_encoder", cfg.clip.pretrained, CLIPTextModel, "clip", pickle)
    tokenizer = _part(out, "tokenizer", cfg.clip.pretrained, CLIPTokenizer, "clip", pickle)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return vae, text_encoder, tokenizer


def uses_channels_last(memory_format: str) -> bool:
    """Whether the UNet trains in channels-last layout: ``auto`` means on CUDA only. On the CPU
    (AMD EPYC with AVX-512 BF16, bf16 autocast) it cost 10% per step at 8x8 and 16x16 latents and
    gained nothing on a 71M UNet at 32x32 (benchmarks/README.md)."""
    if memory_format == "auto":
        return torch.cuda.is_available()
    return memory_format == "channels_last"


def _unet(cfg: RunConfig, student: bool = False) -> UNet2DConditionModel:
    """The UNet (pretrained or new) in the configured memory format and attention; a full LCM
    student (``unet.distill`` without LoRA) gets its guidance-scale input."""
    c = cfg.unet
    if c.pretrained:
        unet = load_component(UNet2DConditionModel, c.pretrained, "unet", cfg.allow_pickle)
    else:
        unet = build_unet(get_preset(cfg.model))
    if student and c.distill is not None and c.lora is None:
        unet = lcm_student(unet, c.distill.guidance_embedding_dim)
    if uses_channels_last(c.memory_format):
        unet = unet.to(memory_format=torch.channels_last)
    if c.attention == "auto":
        use_cpu_attention(unet)
    return unet


def untuned_unet(cfg: RunConfig) -> Denoiser:
    """The pretrained UNet as loaded, frozen and in eval mode (DreamBooth's ``prior_target: model``)."""
    return Denoiser(_unet(cfg).requires_grad_(False).eval(), None)


def block_channels(unet: UNet2DConditionModel, block: str) -> int:
    """The channels of a UNet block's output (``down_blocks.N``, ``mid_block``, ``up_blocks.N``)."""
    widths = list(unet.config.block_out_channels)
    if block == "mid_block":
        return widths[-1]
    kind, number = block.split(".")
    widths = widths if kind == "down_blocks" else widths[::-1]
    if int(number) >= len(widths):
        raise InputError(f"unet.repa.block: this UNet has {len(widths)} {kind}, numbered from 0; got {block!r}")
    return widths[int(number)]


def trained_modules(cfg: RunConfig, text_encoder: CLIPTextModel, encoder_width: int | None = None) -> Denoiser:
    """The UNet (pretrained or new) and, with ``unet.train_text_encoder``, the text encoder, with
    LoRA adapters when ``unet.lora`` is set, and with ``unet.repa`` the projector onto an image
    encoder's ``encoder_width`` features; what trains has ``requires_grad``."""
    c = cfg.unet
    unet = _unet(cfg, student=True)
    if c.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if c.lora is not None:
        add_lora(unet, c.lora, c.lora.target_modules)
    trained_text_encoder = None
    if c.train_text_encoder:
        trained_text_encoder = text_encoder
        if c.lora is not None:
            add_lora(text_encoder, c.lora, c.lora.text_encoder_target_modules)
        else:
            text_encoder.requires_grad_(True)
    projector, block = None, None
    if c.repa is not None:
        block = c.repa.block
        projector = Projector(block_channels(unet, block), encoder_width, c.repa.projector_dim)
    return Denoiser(unet, trained_text_encoder, projector, block)


def sampling_scheduler(cfg: RunConfig):
    """The scheduler the saved pipeline samples with; training's DDPM forward process is built
    from its config, so both use one noise schedule (a pretrained model's own, when given)."""
    preset = get_preset(cfg.model)
    c = cfg.unet
    pretrained = pretrained_schedule(c.pretrained)
    predicts = pretrained.pop("prediction_type", c.prediction_type)
    if predicts != c.prediction_type:
        raise InputError(
            f"unet.prediction_type is {c.prediction_type!r} but the pretrained model {c.pretrained} predicts "
            f"{predicts!r}: set unet.prediction_type: {predicts}"
        )
    schedule = {
        **preset.scheduler,
        **pretrained,
        **(zero_terminal_snr_config() if c.zero_terminal_snr else {}),
    }
    return build_scheduler(dataclasses.replace(preset, prediction_type=c.prediction_type, scheduler=schedule))


def save_outputs(out: Path, cfg: RunConfig, vae, text_encoder, tokenizer, model: Denoiser, sampler) -> Path:
    """The trained result: LoRA adapters in ``out/lora`` (with ``unet.lora``), else a complete
    pipeline folder in ``out/pipeline``. Returns the folder written."""
    check_finite(model, "the UNet stage's outputs")
    unet = model.unet.to(memory_format=torch.contiguous_format)
    if cfg.unet.lora is not None:
        save_lora(out / "lora", unet, model.text_encoder)
        return out / "lora"
    pipe = LatentDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(), scheduler=sampler
    )
    pipe.save_pretrained(out / "pipeline")
    return out / "pipeline"


@dataclasses.dataclass
class Caches:
    """The frozen models' outputs, computed once: each bucket's latent posterior (training's
    buckets first, then DreamBooth's class images'), and (unless the text encoder trains) every
    caption's embedding with its row (``""``, caption dropout, is row 0). A user source's are read
    from shards on disk by row; built-in data's are tensors."""

    buckets: list
    latents: list[dict]
    train: int
    embeds: torch.Tensor | TextRows | None
    row_of: dict[str, int] | None
    minutes: float
    # data.cache: none: the encoder of the source's batches, fed the training batch sequence.
    in_loop: InLoopEncoder | None = None


def _source_buckets(cfg: RunConfig, source: SourceSet, vae, cache_dir: Path, accelerator: Accelerator) -> list:
    """The source's cached buckets that fill a batch; images lost to decoding are reported."""
    rows, skipped, _ = cached_source_latents(vae, source, cfg.data, cache_dir, accelerator)
    source.write_report(skipped)
    found = source.found
    check_skipped(cfg.data, len(found.skipped) + len(skipped), found.total)
    batch = cfg.unet.batch_size // cfg.unet.gradient_accumulation_steps
    small = [r for r in rows if len(r) < batch]
    if accelerator.is_main_process:
        if skipped:
            print(f"cache: {len(skipped)} image(s) could not be decoded and are skipped (listed in {source.report})")
        for r in small:
            print(
                f"cache: bucket {r.bucket[0]}x{r.bucket[1]} has {len(r)} image(s) left, fewer than a batch: not trained"
            )
    kept = [r for r in rows if len(r) >= batch]
    if not kept:
        raise InputError(f"data.source {cfg.data.source}: no bucket holds a whole batch ({batch}) of usable images")
    return kept


def build_caches(
    cfg: RunConfig,
    train: ImageSet | SourceSet,
    parts: tuple,
    out: Path,
    accelerator: Accelerator,
    prior: ImageSet | None = None,
) -> Caches:
    """Encode the training images (and captions) once, or read what an earlier run cached; with
    ``prior`` (DreamBooth's class images) those too, after the training buckets. A `SourceSet`
    is cached in shards, each process encoding its share (`training.source_cache`)."""
    vae, text_encoder, tokenizer = parts
    cache_dir = Path(cfg.data.cache_dir or out / "cache")
    start = time.monotonic()
    sharded = isinstance(train, SourceSet)
    in_loop = None
    if sharded and cfg.data.cache == "none":
        in_loop = InLoopEncoder(vae, train, cfg.data.random_flip, cfg.data.num_workers)
        buckets = in_loop.buckets()
    elif sharded:
        buckets = _source_buckets(cfg, train, vae, cache_dir, accelerator)
    else:
        buckets = list(train.buckets)
    latents = [b.latents for b in buckets] if sharded else []
    count = len(buckets)
    buckets += prior.buckets if prior is not None else []
    embeds, row_of = None, None
    with accelerator.main_process_first():  # the others then read what the main process wrote
        latents += [cached_latents(vae, b, cache_dir, flip=cfg.data.random_flip) for b in buckets[len(latents) :]]
        captions = {t for bucket in buckets for caps in bucket.captions for t in caps}
        if not cfg.unet.train_text_encoder and not sharded:
            embeds, text_index = cached_texts(text_encoder, tokenizer, sorted(captions), cache_dir)
            row_of = {"": 0, **dict(zip(sorted(captions), text_index.tolist(), strict=True))}
    if not cfg.unet.train_text_encoder and sharded:
        ahead = set() if in_loop is not None else captions  # in the loop: the embedder encodes them
        shard_mb = cfg.data.shard_mb
        embeds, row_of = cached_text_shards(text_encoder, tokenizer, ahead, cache_dir, shard_mb, accelerator)
    return Caches(buckets, latents, count, embeds, row_of, (time.monotonic() - start) / 60, in_loop)


def add_features(cfg: RunConfig, caches: Caches, out: Path, accelerator: Accelerator) -> int:
    """With ``unet.repa``: each bucket's encoder patch features (and its flipped images') into its
    latent cache; returns the encoder's width."""
    r = cfg.unet.repa
    source = r.encoder
    if source is None:
        if not (out / "clip").is_dir():
            raise InputError(
                f"{out / 'clip'} does not exist: unet.repa aligns to the run's own CLIP model; run stage "
                "'clip' first or set unet.repa.encoder to a CLIP model folder or Hub id"
            )
        source = str(out)
    encoder = load_encoder(source, cfg.allow_pickle).to(accelerator.device)
    for bucket, cache in zip(caches.buckets, caches.latents, strict=True):
        if not hasattr(bucket, "float_batch"):
            raise InputError("unet.repa: needs the training images in memory (a built-in dataset)")
        cache.update(cached_features(encoder, bucket, r.layer, cfg.data.random_flip))
    return encoder.config.hidden_size


def bucket_name(bucket) -> str:
    """A bucket's "WxH" (`Pixels` or cached rows)."""
    width, height = bucket.bucket if hasattr(bucket, "bucket") else bucket.images.shape[:-3:-1]
    return f"{width}x{height}"


class DenoisingLoss:
    """One step's loss: a batch of cached latents noised at random timesteps, captions dropped
    with probability ``caption_dropout``, and the UNet's output regressed on the prediction
    target, weighted per sample by min-SNR when set. The draws are made for a micro-batch over
    all processes and then cut to this process's part, so that each sample sees the same noise at
    any world size."""

    def __init__(
        self,
        cfg: RunConfig,
        caches: Caches,
        parts: tuple,
        model,
        sampler,
        accelerator: Accelerator,
        prior: ImageSet | None = None,
        teacher: Denoiser | None = None,
    ):
        vae, text_encoder, self.tokenizer = parts
        # dreambooth.prior_target "model": the untuned UNet whose predictions the prior loss regresses onto.
        self.teacher = teacher
        self.c, self.flip, self.scale = cfg.unet, cfg.data.random_flip, vae.config.scaling_factor
        self.model, self.device = model, accelerator.device
        # Training's forward process is the saved sampler's noise schedule.
        self.noise_scheduler = DDPMScheduler.from_config(sampler.config)
        self.channels_last = uses_channels_last(self.c.memory_format)
        self.batches = micro_batches(
            caches.buckets[: caches.train],
            self.c.batch_size,
            self.c.gradient_accumulation_steps,
            seed_of(cfg.seed, "unet.batches"),
            accelerator,
        )
        if caches.in_loop is not None:
            caches.in_loop.sampler = self.batches
        self.generator = torch.Generator().manual_seed(seed_of(cfg.seed, "unet.noise"))
        self.latents_of = {id(b): cache for b, cache in zip(caches.buckets, caches.latents, strict=True)}
        # DreamBooth's prior preservation: a batch of class images beside each batch of the subject's.
        self.prior_batches = None
        if prior is not None:
            seed = seed_of(cfg.seed, "unet.class_batches")
            self.prior_batches = prior.batches(self.c.batch_size, self.c.gradient_accumulation_steps, seed, accelerator)
        self.varies = self.c.shuffle_tags or self.c.tag_dropout > 0
        self.embed = None
        if not self.c.train_text_encoder:
            self.embed = CaptionEmbedder(caches.embeds, caches.row_of, text_encoder, self.tokenizer)
        # unet.repa: the encoder's patch grid that the projected features are compared on.
        self.grid = None
        if self.c.repa is not None:
            self.grid = square_grid(caches.latents[0]["features"].shape[1])
        self.alignment: list[torch.Tensor] = []

    def captions(self, batch: Batch) -> list[str]:
        """The chunk's captions as trained this step: one of each image's captions, its tags
        varied (`vary_caption`), or "" with probability ``caption_dropout``; drawn for the whole
        chunk (the dropout first, as before tags could vary)."""
        c, generator = self.c, self.generator
        keep = (torch.rand(len(batch.chunk), generator=generator) >= c.caption_dropout).tolist()
        picked = batch.pixels.pick_captions(batch.chunk, generator)
        if self.varies:
            picked = [vary_caption(t, c.shuffle_tags, c.keep_tokens, c.tag_dropout, generator) for t in picked]
        return [text if k else "" for text, k in zip(picked, keep, strict=True)]

    def noised(self, batch: Batch) -> dict[str, torch.Tensor | None]:
        """One micro-batch's model input and regression terms: z0 drawn from the cached posterior
        (flipped half the time with ``random_flip``), noised at uniform timesteps, its captions'
        condition, and with ``masked_loss`` its loss masks averaged to the latent grid."""
        c, generator = self.c, self.generator
        cache, index, part = self.latents_of[id(batch.pixels)], batch.index, batch.part
        n = len(batch.chunk)
        shape = (n, *cache["mean"].shape[1:])
        mean, std = cache["mean"][index], cache["std"][index]
        flip = None
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5)[part].view(-1, 1, 1, 1)
            mean = torch.where(flip, cache["mean_flipped"][index], mean)
            std = torch.where(flip, cache["std_flipped"][index], std)
        z0 = (mean + std * torch.randn(shape, generator=generator)[part]) * self.scale

        def draw() -> torch.Tensor:
            return offset_noise(torch.randn(shape, generator=generator), c.noise_offset, generator)

        noise = draw()
        if c.noise_assignment == "batch":
            noise[part] = immiscible_noise(z0, noise[part])
        elif c.noise_assignment == "knn":
            draws = [noise] + [draw() for _ in range(c.noise_candidates - 1)]
            noise[part] = nearest_noise(z0, torch.stack(draws)[:, part])
        t = sample_timesteps(
            n, *c.timestep_range, generator, c.timestep_density, c.timestep_logit_mean, c.timestep_logit_std
        )[part]
        texts = self.captions(batch)[part]
        cond = token_ids(self.tokenizer, texts) if c.train_text_encoder else self.embed(texts)
        noisy_input = perturbed_noise(noise, c.input_perturbation, generator)[part]
        mask = None
        if c.masked_loss and batch.pixels.masks is not None:
            mask = batch.pixels.masks[index].float() / 255
            if flip is not None:
                mask = torch.where(flip, mask.flip(-1), mask)
            mask = F.interpolate(mask, size=z0.shape[-2:], mode="area")
        terms = {"z0": z0, "noise": noise[part], "noisy_input": noisy_input, "t": t, "cond": cond, "mask": mask}
        if self.grid is not None:  # REPA's target: the clean image's encoder features, flipped with it
            features = cache["features"][index]
            if flip is not None:
                features = torch.where(flip.view(-1, 1, 1), cache["features_flipped"][index], features)
            terms["features"] = features
        return {k: v if v is None else v.to(self.device) for k, v in terms.items()}

    def _per_sample(self, parts: list[dict]) -> list[torch.Tensor]:
        """Each part's per-sample losses; parts of one latent shape share one forward pass."""
        c = self.c
        if len(parts) > 1 and len({p["z0"].shape[1:] for p in parts}) == 1 and not c.train_text_encoder:
            sizes = [len(p["t"]) for p in parts]
            keys = ("z0", "noise", "noisy_input", "t", "cond") + (("features",) if self.grid is not None else ())
            joined = {k: torch.cat([p[k] for p in parts]) for k in keys}
            masks = [p["mask"] if p["mask"] is not None else torch.ones_like(p["z0"][:, :1]) for p in parts]
            joined["mask"] = torch.cat(masks) if any(p["mask"] is not None for p in parts) else None
            return list(self._per_sample([joined])[0].split(sizes))
        losses = []
        for p in parts:
            zt = self._noisy(p)
            if self.grid is None:
                pred = self.model(zt, p["t"], p["cond"]).float()
            else:
                pred, projected = self.model(zt, p["t"], p["cond"], grid=self.grid)
                pred = pred.float()
            target = prediction_target(self.noise_scheduler, p["z0"], p["noise"], p["t"], c.prediction_type)
            per_sample = denoising_loss(pred, target, c.loss, c.huber_delta, p["mask"])
            per_sample = self._snr_weighted(per_sample, p["t"])
            if self.grid is not None:  # REPA: the alignment loss beside the (weighted) denoising loss
                aligned = alignment_loss(projected, p["features"])
                self.alignment.append(aligned.detach())
                per_sample = per_sample + c.repa.weight * aligned
            losses.append(per_sample)
        return losses

    def _noisy(self, p: dict) -> torch.Tensor:
        """A part's noisy latents z_t, in the training memory format."""
        zt = self.noise_scheduler.add_noise(p["z0"], p["noisy_input"], p["t"])
        return zt.contiguous(memory_format=torch.channels_last) if self.channels_last else zt

    def _snr_weighted(self, per_sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample losses times their min-SNR weights (unchanged without ``min_snr_gamma``)."""
        c = self.c
        if c.min_snr_gamma is None:
            return per_sample
        return per_sample * min_snr_weights(self.noise_scheduler, t, c.min_snr_gamma, c.prediction_type)

    def _matched(self, p: dict) -> torch.Tensor:
        """A part's per-sample distance to the untuned UNet's prediction at the same noisy latents
        (min-SNR weighted as the denoising loss is): the prior loss of ``prior_target: model``."""
        zt = self._noisy(p)
        pred = self.model(zt, p["t"], p["cond"]).float()
        with torch.no_grad():
            target = self.teacher(zt, p["t"], p["cond"]).float()
        return self._snr_weighted(denoising_loss(pred, target), p["t"])

    def _preserved(self, subject: dict, classes: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The instance loss, and the prior loss against the untuned UNet: the class images under
        their captions, plus the subject's images (same noisy latents) under the first class prompt."""
        instance = self._per_sample([subject])[0].mean()
        first = self.c.dreambooth.class_prompts[0]
        anchor = {**subject, "cond": self.embed([first] * len(subject["t"])).to(subject["cond"]), "mask": None}
        return instance, self._matched(classes).mean() + self._matched(anchor).mean()

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        terms = self._terms()
        if self.alignment:  # REPA's term alone, for the loss log: minus the mean cosine similarity
            terms["alignment_loss"] = torch.cat(self.alignment).mean()
            self.alignment.clear()
        return terms

    def _terms(self) -> dict[str, torch.Tensor]:
        parts = [self.noised(next(self.batches))]
        if self.prior_batches is None:
            return {"loss": self._per_sample(parts)[0].mean()}
        parts.append(self.noised(next(self.prior_batches)))
        if self.teacher is not None:
            instance, prior = self._preserved(*parts)
        else:
            instance, prior = (losses.mean() for losses in self._per_sample(parts))
        weight = self.c.dreambooth.prior_loss_weight
        return {"loss": instance + weight * prior, "instance_loss": instance, "prior_loss": prior}


def train_unet(
    cfg: RunConfig, train: ImageSet | SourceSet, out: Path, accelerator: Accelerator, resume: Path | None = None
) -> dict:
    """Train the UNet (or its LoRA) and save a pipeline folder to ``out/pipeline`` (``out/lora``)."""
    c = cfg.unet
    vae, text_encoder, tokenizer = frozen_parts(cfg, out)
    parts = (vae.to(accelerator.device), text_encoder.to(accelerator.device), tokenizer)
    sampler = sampling_scheduler(cfg)
    prior = None
    if c.dreambooth is not None and c.dreambooth.class_prompt is not None:
        prior = class_images(cfg, parts, sampler, out, accelerator)
        if accelerator.is_main_process:
            print(
                f"dreambooth: {prior.images.summary} in {prior.folder} ({prior.generated} drawn, {prior.reused} reused)"
            )
    caches = build_caches(cfg, train, parts, out, accelerator, prior.images if prior else None)
    encoder_width = add_features(cfg, caches, out, accelerator) if c.repa is not None else None
    model = trained_modules(cfg, text_encoder, encoder_width)
    # foreach: one fused update over all parameters instead of three ops and a Python check per parameter.
    ema = EMAModel(trainable(model), decay=c.ema_decay, foreach=True)
    optimizer = make_optimizer(trainable(model), c)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    teacher = None
    if prior is not None and c.dreambooth.prior_target == "model":
        teacher = untuned_unet(cfg).to(accelerator.device)
    denoising = DenoisingLoss(cfg, caches, parts, model, sampler, accelerator, prior.images if prior else None, teacher)
    stateful = {"batches": denoising.batches, "generator": GeneratorState(denoising.generator)}
    loss = denoising
    if c.distill is not None:
        # LCM-LoRA: the teacher is the student's UNet with its adapters off, the target the student.
        teacher = target = None
        if c.lora is None:
            teacher = untuned_unet(cfg).to(accelerator.device)
            target = Denoiser(lcm_target(accelerator.unwrap_model(model).unet), None)
            stateful["lcm_target"] = target
        loss = ConsistencyLoss(denoising, c.distill, teacher, target, accelerator)
        sampler = lcm_scheduler(sampler)
    views = EMAViews(model, ema, accelerator, parts, sampler, c, out)
    if c.pretrained:
        views.remember_base()
    check = None
    if c.eval_every and cfg.data.name == "emoji":
        clip_dir = out / "clip"
        if not clip_dir.is_dir():
            raise InputError(f"{clip_dir} does not exist: the emoji monitor judges with the run's CLIP model")
        every, prompts = c.eval_every, c.quality_prompts
        check = emoji_check(views.pipeline, clip_dir, prompts, every, c.target, c.held_out_target, c.decay_at)
    elif c.eval_every:
        check = adherence_check(cfg.data.name, views.pipeline, c.quality_prompts, c.eval_every, c.target, c.decay_at)
    if denoising.prior_batches is not None:
        stateful["class_batches"] = denoising.prior_batches
    result = run_loop(
        accelerator,
        model,
        optimizer,
        loss,
        c,
        desc="unet",
        ema=ema,
        validation=views.validation_grid,
        on_minute=views.snapshot,
        checkpoints=stage_checkpoints(out, "unet", c, stateful, resume),
        quality=check,
    )
    inner = accelerator.unwrap_model(model)
    ema.copy_to(trainable(inner))
    metrics = {
        "steps": result.steps,
        "minutes": round(result.minutes, 2),
        "seconds": round(result.minutes * 60, 3),  # unrounded enough for short benchmark runs
        "cache_minutes": round(caches.minutes, 3),
        "cache_seconds": round(caches.minutes * 60, 3),
        "final_loss": result.final_loss,
        "skipped_steps": result.skipped,
        "images": sum(len(b) for b in caches.buckets[: caches.train]),
        "buckets": {bucket_name(b): len(b) for b in caches.buckets[: caches.train]},
        **result.quality_report(check),
    }
    if denoising.embed is not None and denoising.varies:
        metrics["captions_encoded_in_loop"] = denoising.embed.encoded
    if prior is not None:
        last = next((e for e in reversed(result.losses) if "prior_loss" in e), {})
        metrics["class_images"] = prior.report()
        metrics["final_prior_loss"] = last.get("prior_loss")
        metrics["final_instance_loss"] = last.get("instance_loss")
    if accelerator.is_main_process:
        written = save_outputs(out, cfg, *parts, inner, sampler)
        metrics["lora" if cfg.unet.lora is not None else "pipeline"] = str(written)
        result.save(out / "logs" / "unet_losses.json")
    accelerator.wait_for_everyone()
    return metrics
