"""``ldm train CONFIG --dry-run``: what a run would do, without training.

The resolved config, the stages and where each model comes from, the data (the ``ldm data
check`` summary for a user's source; the size of a built-in set), the models' sizes (built on the
meta device: no weights are read or allocated) and each stage's planned steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_pipeline.loading import load_component_config
from ldm_pipeline.presets import build_text_encoder, build_unet, build_vae

from .config import STAGES, RunConfig, StageConfig, geometry, to_dict


def _millions(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M parameters" if n >= 1e6 else f"{n / 1e3:.0f}K parameters"


def _model(cfg: RunConfig, name: str) -> torch.nn.Module:
    """The stage's model with its architecture and no weights: the preset's, or the pretrained config's."""
    stage = getattr(cfg, name)
    with init_empty_weights():
        if stage.pretrained is None:
            return {"vae": build_vae, "clip": build_text_encoder, "unet": build_unet}[name](cfg.model)
        if name == "clip":
            text = load_component_config(CLIPTextModel, stage.pretrained, "text_encoder")
            return CLIPTextModel(CLIPTextConfig.from_dict(text))
        cls = AutoencoderKL if name == "vae" else UNet2DConditionModel
        return cls.from_config(load_component_config(cls, stage.pretrained, name))


def _origin(cfg: RunConfig, name: str, stages: list[str]) -> str:
    stage = getattr(cfg, name)
    if name not in stages:
        where = stage.pretrained or f"the run folder's {name} stage, run before"
        return f"from {where} (not trained in this run)"
    if stage.pretrained is None:
        return "trained from zero"
    if name == "unet":
        return f"fine-tuned from {stage.pretrained}" + (" with LoRA adapters" if cfg.unet.lora else "")
    return f"loaded from {stage.pretrained} (not trained)"


def _steps(name: str, stage: StageConfig) -> str:
    """The stage's step plan: count or time budget, batch, schedule, and the target that may end it early."""
    if stage.steps is not None:
        length = f"{stage.steps:,} steps"
        if stage.max_minutes is not None:
            length += f" (at most {stage.max_minutes:g} min)"
    else:
        length = f"as many steps as fit in {stage.max_minutes:g} min"
    accumulate = stage.gradient_accumulation_steps
    batch = f"batch {stage.batch_size}" + (f" ({accumulate} micro-batches)" if accumulate > 1 else "")
    line = f"{length} × {batch}, LR {stage.learning_rate:g} {stage.lr_scheduler} ({stage.warmup_steps} warm-up)"
    target = getattr(stage, "target", None)
    if target is not None:
        measure = "held-out PSNR" if name == "vae" else "adherence"
        if getattr(stage, "held_out_target", None) is not None:  # built-in emoji: two measures
            measure = f"held-out skin tone {stage.held_out_target:g} and R-precision"
        line += f"; stops at {measure} {target:g}, measured every {stage.eval_every} steps"
    return line


def _data(cfg: RunConfig, check_source: Callable[[RunConfig], str] | None) -> str:
    d = cfg.data
    if d.source is None:
        count = f"{d.num_samples:,} images" if d.num_samples else "all its images"
        return f"built-in {d.name}: {count} at {d.resolution} px, {d.holdout} held out"
    summary = check_source(cfg) if check_source else "(not read)"
    return f"{d.source}: {summary}"


def source_summary(cfg: RunConfig) -> str:
    """The ``ldm data check`` summary line of the run's data source (decodes every image)."""
    from ldm_pipeline.data.check import check_source
    from ldm_pipeline.tokenizer import load_clip_tokenizer

    d = cfg.data
    report = check_source(
        d.source,
        d.caption_column,
        d.image_column,
        d.split,
        resolution=d.resolution if d.bucketing else None,
        bucket_step=geometry(cfg).bucket_step,
        max_aspect=d.max_aspect,
        background=tuple(d.background),
        max_pixels=d.max_image_pixels,
        tokenizer=load_clip_tokenizer(),
    )
    return report["summary"]


def describe(
    cfg: RunConfig, stages: list[str] | None = None, check_source: Callable[[RunConfig], str] | None = source_summary
) -> list[str]:
    """The dry run's lines for a resolved config."""
    stages = stages or cfg.stages
    lines = ["resolved config:", *("  " + line for line in yaml.safe_dump(to_dict(cfg), sort_keys=False).splitlines())]
    lines.append(f"data: {_data(cfg, check_source)}")
    for name in STAGES:
        if name not in stages and "unet" not in stages:
            continue
        stage = getattr(cfg, name)
        lines.append(f"{name}: {_origin(cfg, name, stages)}; {_millions(_model(cfg, name))}")
        if name in stages and (stage.pretrained is None or name == "unet"):
            lines.append(f"  plan: {_steps(name, stage)}")
    lines.append(f"stages to run: {', '.join(stages)} (dry run: nothing trained)")
    return lines
