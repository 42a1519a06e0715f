"""Run the stages a config names, in order, writing everything under one output folder.

Layout of a run folder::

    config.yaml         the resolved config (read back by later stages and on resume)
    vae/                AutoencoderKL with the measured scaling_factor
    clip/               the whole CLIPModel, kept as the evaluator
    text_encoder/ tokenizer/
    pipeline/           the complete LatentDiffusionPipeline folder
    lora/               with unet.lora: the adapters, for pipe.load_lora_weights(...)
    checkpoints/<stage>/step-NNNNNNNN/   the whole training state (safetensors + JSON)
    logs/               loss curves per stage (JSON) and the TensorBoard event files
    cache/              cached latents and text embeddings (unless data.cache_dir is set)
    validation/         validation grids (with unet.validation_every_steps)
    skipped_images.jsonl  with data.source: each unusable image and why
    train_report.json   per-stage metrics; a stage listed here is finished
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import set_seed

from ldm_pipeline.errors import InputError
from ldm_pipeline.yaml_io import YAMLSyntaxError, read_yaml

from .checkpoint import CheckpointError, latest_checkpoint
from .clip import train_clip
from .config import STAGES, ConfigError, RunConfig, geometry, save_config, to_dict
from .data import load_images, load_source_set
from .loop import make_accelerator
from .seeds import seed_of
from .unet import train_unet
from .vae import train_vae

# Keys a resumed run may change: where it logs and caches, when it checkpoints, validates and
# stops (a quality target included). Any other change alters the maths of the run being continued.
RESUMABLE_CHANGES = (
    "stages",
    "report_to",
    "data.cache_dir",
    "data.shard_mb",
    "data.num_workers",
    "data.encode_batch_size",
    "max_minutes",
    "target",
    "checkpoint_every",
    "checkpoint_keep",
    "max_nonfinite_steps",
    "validation_every_steps",
    "validation_prompts",
    "snapshot_every_minutes",
    "push_to_hub",
    "hub_private",
)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.update(_flat(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def config_changes(saved: dict, cfg: RunConfig) -> list[str]:
    """Keys whose values differ between a run's saved config and ``cfg``, other than `RESUMABLE_CHANGES`."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or key.rsplit(".", 1)[-1] in RESUMABLE_CHANGES:
            continue
        if old.get(key) != new.get(key):
            changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed


def _resume_points(cfg: RunConfig, out: Path, stages: list[str], resume: str, force: bool) -> dict[str, Path | None]:
    """Per stage to run: the checkpoint to resume from (None: start it afresh)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume: {out} holds no run (no config.yaml)")
    try:
        saved = read_yaml(saved_path)
    except YAMLSyntaxError as err:
        raise ConfigError(f"resume: the run's own config is broken: {err}") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"resume: {saved_path} is not a run config (a {type(saved).__name__}, not a mapping)")
    changes = config_changes(saved, cfg)
    if changes and not force:
        raise ConfigError(
            "resume: the config differs from the run's in what it computes: "
            + "; ".join(changes[:8])
            + ". Use the run's config, or pass --force-resume to continue with the new one"
        )
    if resume == "latest":
        return {stage: latest_checkpoint(out / "checkpoints" / stage) for stage in stages}
    path = Path(resume)
    stage = path.parent.name
    if stage not in STAGES or not path.is_dir():
        raise CheckpointError(f"resume: {path} is not a checkpoint folder (<run>/checkpoints/<stage>/step-N)")
    return {s: (path if s == stage else None) for s in stages}


def quality_summary(report: dict, cfg: RunConfig, out: Path, config_path: Path | None = None) -> list[str]:
    """One line per stage with a quality target: what it reached, or that it fell short and the
    command that continues it (from its last checkpoint, with its ceilings doubled)."""
    lines = []
    for stage in ("vae", "unet"):
        entry = report.get(stage, {})
        if "target" not in entry:
            continue
        c = getattr(cfg, stage)
        fmt = "{:.2f} dB" if entry["quality_metric"] == "psnr" else "{:.3f}"
        value, target = fmt.format(entry["quality"]), fmt.format(entry["target"])
        for name, level in entry.get("quality_parts", {}).items():  # the emoji's held-out skin tone
            value += f", {name} {fmt.format(level)}"
            part_target = entry.get("part_targets", {}).get(name)
            target += f", {name} {fmt.format(part_target)}" if part_target is not None else ""
        where = f"step {entry['steps']:,} ({entry['minutes']:.1f} min)"
        if entry["target_reached"]:
            lines.append(f"{stage}: {entry['quality_metric']} {value} reached the target {target} at {where}")
            continue
        ceiling = f"the {c.max_minutes:g}-minute ceiling" if entry["stopped_by"] == "minutes" else "its step ceiling"
        raise_it = (
            f"{stage}.max_minutes={2 * c.max_minutes:g}"
            if entry["stopped_by"] == "minutes"
            else f"{stage}.steps={2 * entry['steps']} --force-resume"
        )
        checkpoint = latest_checkpoint(out / "checkpoints" / stage)
        config = config_path or out / "config.yaml"
        after = " (the stages after it train again)" if stage != cfg.stages[-1] else ""
        lines.append(
            f"{stage}: NOT DONE: {entry['quality_metric']} {value} at {where}, stopped by {ceiling} below the "
            f"target {target}. Continue it{after} with: ldm train {config} --output {out} --resume {checkpoint} "
            f"{raise_it}"
        )
    return lines


def train(
    cfg: RunConfig,
    out: str | Path,
    stages: list[str] | None = None,
    resume: str | None = None,
    force_resume: bool = False,
) -> dict:
    """Train the given stages (default: the config's) and return their metrics.

    Args:
        cfg: a validated run config.
        out: the run folder; stages read earlier stages' outputs from it.
        stages: a subset of ``cfg.stages`` to run now, e.g. ``["unet"]``.
        resume: ``"latest"`` (each stage from its newest complete checkpoint; stages already
            finished are skipped) or a checkpoint folder.
        force_resume: resume even though the config changes what the run computes.
    """
    out = Path(out)
    stages = stages or cfg.stages
    report: dict = {}
    points: dict[str, Path | None] = {}
    if resume is not None:
        points = _resume_points(cfg, out, stages, resume, force_resume)
        if (out / "train_report.json").is_file():
            report = json.loads((out / "train_report.json").read_text())
        if resume == "latest":  # a finished stage's final checkpoint is not a point to resume from
            points = {s: (None if s in report else p) for s, p in points.items()}
    accelerator = make_accelerator(cfg.mixed_precision, cfg.seed, cfg.report_to, out / "logs")
    if accelerator.is_main_process:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        from ldm_pipeline.hub import OFFLINE, hub_offline

        if cfg.push_to_hub and hub_offline():
            print(f"warning: push_to_hub: {OFFLINE}; this run trains and keeps its outputs in {out}, unpushed")
    # Every micro-batch fills from one bucket: a bucket smaller than the largest micro-batch (over
    # all processes) of the stages that train here is folded into its neighbour.
    batch = max(getattr(cfg, s).batch_size // getattr(cfg, s).gradient_accumulation_steps for s in stages)
    dreambooth = cfg.unet.dreambooth if "unet" in stages else None
    data_args = {
        "step": geometry(cfg).bucket_step,
        "min_bucket_size": batch,
        "report_dir": out,
        "main_process": accelerator.is_main_process,
        "masks": cfg.unet.masked_loss and "unet" in stages,
        "default_caption": dreambooth.instance_prompt if dreambooth else None,
    }
    # The VAE and CLIP stages train on pixels in memory; the UNet stage streams a source's images
    # once into a sharded cache (training/source_cache.py), whatever the size of the set.
    train_pixels, holdout = None, None
    if cfg.data.source is None or "vae" in stages or "clip" in stages:
        train_pixels, holdout = load_images(cfg.data, **data_args)
    unet_data = train_pixels
    if cfg.data.source is not None and "unet" in stages:
        unet_data = load_source_set(cfg.data, **data_args)
    report.update({"mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes})
    resumed_stage = next((s for s in stages if points.get(s) is not None), None)
    for position, stage in enumerate(stages):
        # A stage listed in the report finished before the interruption (its outputs are saved):
        # resuming skips it, unless a checkpoint of it, or of an earlier stage, was chosen.
        earlier = resumed_stage is None or position < stages.index(resumed_stage)
        if resume is not None and stage in report and earlier:
            continue
        point = points.get(stage)
        set_seed(seed_of(cfg.seed, f"{stage}.start") if stage in STAGES else cfg.seed)
        if stage == "vae":
            report["vae"] = train_vae(cfg, train_pixels, holdout, out, accelerator, point)
        elif stage == "clip":
            report["clip"] = train_clip(cfg, train_pixels, out, accelerator, point)
        elif stage == "unet":
            report["unet"] = train_unet(cfg, unet_data, out, accelerator, point)
        else:
            raise InputError(f"unknown stage {stage!r}; stages are vae, clip, unet")
        if accelerator.is_main_process:
            (out / "train_report.json").write_text(json.dumps(report, indent=2))
    if cfg.push_to_hub and accelerator.is_main_process:
        from ldm_pipeline.hub import HubError, push

        result = out / ("lora" if cfg.unet.lora is not None else "pipeline")
        try:
            report["hub"] = push(result, cfg.push_to_hub, private=cfg.hub_private)
        except HubError as err:
            raise HubError(
                f"push_to_hub: {err}. The run's outputs are kept in {out}; push them with "
                f"`ldm push --model {result} --repo-id {cfg.push_to_hub}`"
            ) from err
        (out / "train_report.json").write_text(json.dumps(report, indent=2))
    accelerator.end_training()
    return report
