"""Run the stages a config names, in order, writing everything under one output folder.

Layout of a run folder::

    config.yaml         the resolved config (read back by later stages and on resume)
    vae/                AutoencoderKL with the measured scaling_factor
    clip/               the whole CLIPModel, kept as the evaluator
    text_encoder/ tokenizer/
    pipeline/           the complete LatentDiffusionPipeline folder
    logs/               loss curves per stage (JSON) and the TensorBoard event files
    cache/              cached latents and text embeddings (unless data.cache_dir is set)
    validation/         validation grids (with unet.validation_every_steps)
    train_report.json   per-stage metrics
    skipped_images.jsonl  with data.source: each unusable image and why
    lora/               with unet.lora: the adapters, for pipe.load_lora_weights(...)
"""

from __future__ import annotations

import json
from pathlib import Path

from .clip import train_clip
from .config import RunConfig, geometry, save_config
from .data import load_images
from .loop import make_accelerator
from .unet import train_unet
from .vae import train_vae


def train(cfg: RunConfig, out: str | Path, stages: list[str] | None = None) -> dict:
    """Train the given stages (default: the config's) and return their metrics.

    Args:
        cfg: a validated run config.
        out: the run folder; stages read earlier stages' outputs from it.
        stages: a subset of ``cfg.stages`` to run now, e.g. ``["unet"]``.
    """
    out = Path(out)
    stages = stages or cfg.stages
    accelerator = make_accelerator(cfg.mixed_precision, cfg.seed, cfg.report_to, out / "logs")
    if accelerator.is_main_process:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    # Every batch fills from one bucket: a bucket smaller than the largest global batch of the
    # stages that train here is folded into its neighbour.
    batch = max(getattr(cfg, s).batch_size for s in stages) * accelerator.num_processes
    train_pixels, holdout = load_images(
        cfg.data, geometry(cfg).bucket_step, batch, out, main_process=accelerator.is_main_process
    )
    report: dict = {"mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes}
    for stage in stages:
        if stage == "vae":
            report["vae"] = train_vae(cfg, train_pixels, holdout, out, accelerator)
        elif stage == "clip":
            report["clip"] = train_clip(cfg, train_pixels, out, accelerator)
        elif stage == "unet":
            report["unet"] = train_unet(cfg, train_pixels, out, accelerator)
        else:
            raise ValueError(f"unknown stage {stage!r}; stages are vae, clip, unet")
        if accelerator.is_main_process:
            (out / "train_report.json").write_text(json.dumps(report, indent=2))
    accelerator.end_training()
    return report
