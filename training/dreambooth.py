"""DreamBooth's class images (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion
Models for Subject-Driven Generation", section 3.3, class-specific prior preservation loss).

Before the subject is learned, the model being tuned draws ``num_class_images`` images of the
class prompt ("a photo of a dog"); training then mixes a batch of them into every step, so that
the model keeps what it knew of the class while it learns the subject. The images are drawn once
and kept as PNG files: in ``class_data_dir`` if set (your own class images there count, and are
topped up), else in a cache folder named by a fingerprint of the model, the prompt and the
sampling settings, so that a rerun reuses them and any change draws anew. Each image is written
to a temporary name and renamed into place, so an interrupted run leaves no half-written file;
a file that cannot be decoded is reported, not used, and drawn again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from ldm_pipeline.data.buckets import fit_to_bucket
from ldm_pipeline.data.decode import SkippedImage, decode_image
from ldm_pipeline.data.sources import IMAGE_EXTENSIONS
from ldm_pipeline.loading import load_component
from ldm_pipeline.pipeline import LatentDiffusionPipeline

from .cache import content_hash, model_fingerprint
from .config import RunConfig
from .data import ImageSet, Pixels
from .seeds import seed_of

_BATCH = 4  # class images drawn per pipeline call


@dataclass
class ClassImages:
    """The class images as one bucket, and what happened to them this run (for the report)."""

    images: ImageSet
    folder: Path
    generated: int
    reused: int
    unreadable: list[str]

    def report(self) -> dict:
        return {
            "folder": str(self.folder),
            "count": len(self.images),
            "generated": self.generated,
            "reused": self.reused,
            "unreadable": self.unreadable,
        }


def _settings(cfg: RunConfig) -> dict:
    db = cfg.unet.dreambooth
    return {
        "prompt": db.class_prompt,
        "resolution": cfg.data.resolution,
        "steps": db.class_sampling_steps,
        "guidance_scale": db.class_guidance_scale,
        "seed": seed_of(cfg.seed, "dreambooth.class_images"),
    }


def _readable(folder: Path, resolution: int) -> tuple[list[np.ndarray], list[str]]:
    """The images already in ``folder`` (square-cropped to ``resolution``) and the unreadable ones."""
    arrays, unreadable = [], []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for path in files:
        try:
            arrays.append(fit_to_bucket(decode_image(str(path)), (resolution, resolution)))
        except SkippedImage as err:
            unreadable.append(f"{path}: {err.reason}")
    return arrays, unreadable


def _free_names(folder: Path, count: int) -> list[Path]:
    names, index = [], 0
    while len(names) < count:
        path = folder / f"class-{index:05d}.png"
        if not path.exists():
            names.append(path)
        index += 1
    return names


@torch.no_grad()
def _draw(
    cfg: RunConfig, parts: tuple, unet: UNet2DConditionModel, sampler, paths: list[Path], accelerator: Accelerator
) -> None:
    """Sample one image per path with the untuned model, each from its own seed."""
    vae, text_encoder, tokenizer = parts
    fresh = type(sampler).from_config(sampler.config)
    pipe = LatentDiffusionPipeline(vae, text_encoder, tokenizer, unet.to(accelerator.device).eval(), fresh)
    pipe.set_progress_bar_config(disable=True)
    settings = _settings(cfg)
    extra = {"guidance_scale": settings["guidance_scale"]} if settings["guidance_scale"] is not None else {}
    for start in tqdm(range(0, len(paths), _BATCH), desc="class images", leave=False):
        chunk = paths[start : start + _BATCH]
        seeds = [torch.Generator().manual_seed(settings["seed"] + int(p.stem.split("-")[-1])) for p in chunk]
        with accelerator.autocast():
            images = pipe(
                [settings["prompt"]] * len(chunk),
                height=settings["resolution"],
                width=settings["resolution"],
                num_inference_steps=settings["steps"],
                generator=seeds,
                **extra,
            ).images
        for image, path in zip(images, chunk, strict=True):
            tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.png")
            image.save(tmp)
            os.replace(tmp, path)


def class_images(cfg: RunConfig, parts: tuple, sampler, out: Path, accelerator: Accelerator) -> ClassImages:
    """The run's class images: read from their folder, the missing ones drawn by the model being
    tuned (its UNet as loaded, before any training) on the main process."""
    db = cfg.unet.dreambooth
    vae, text_encoder, _ = parts
    settings = _settings(cfg)
    unet = None
    if db.class_data_dir is not None:
        folder = Path(db.class_data_dir)
    else:
        unet = load_component(UNet2DConditionModel, cfg.unet.pretrained, "unet", cfg.allow_pickle)
        models = [model_fingerprint(m) for m in (unet, text_encoder, vae)]
        folder = Path(cfg.data.cache_dir or out / "cache") / f"class-images-{content_hash(models, settings)}"
    resolution = cfg.data.resolution
    generated = 0
    with accelerator.main_process_first():
        folder.mkdir(parents=True, exist_ok=True)
        arrays, unreadable = _readable(folder, resolution)
        missing = db.num_class_images - len(arrays)
        if missing > 0 and accelerator.is_main_process:
            if unet is None:
                unet = load_component(UNet2DConditionModel, cfg.unet.pretrained, "unet", cfg.allow_pickle)
            _draw(cfg, parts, unet, sampler, _free_names(folder, missing), accelerator)
            (folder / "settings.json").write_text(json.dumps(settings, indent=2))
            generated = missing
            arrays, unreadable = _readable(folder, resolution)
    del unet
    arrays = arrays[: db.num_class_images]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    pixels = Pixels(images, [[db.class_prompt]] * len(arrays))
    summary = f"{len(arrays)} class images of {db.class_prompt!r}"
    return ClassImages(ImageSet([pixels], summary=summary), folder, generated, len(arrays) - generated, unreadable)
