"""DreamBooth's class images (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion
Models for Subject-Driven Generation", section 3.3, class-specific prior preservation loss).

Before the subject is learned, the model being tuned draws ``num_class_images`` images of the
class prompt ("a photo of a dog"), or in turn of each of a list of prompts; training then mixes a
batch of them into every step, so that the model keeps what it knew while it learns the subject.
The images are drawn once and kept as PNG files, each beside a same-name ``.txt`` holding its
prompt: in ``class_data_dir`` if set (your own class images there count, and are topped up; one
without a ``.txt`` is captioned with the first class prompt), else in a cache folder named by a
fingerprint of the model, the prompts and the sampling settings, so that a rerun reuses them and
any change draws anew. Each file is written to a temporary name and renamed into place, the
caption before its image, so an interrupted run leaves no half-written file; a file that cannot
be decoded is reported, not used, and drawn again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from ldm_pipeline.data.buckets import fit_to_bucket
from ldm_pipeline.data.decode import SkippedImage, decode_image
from ldm_pipeline.data.sources import IMAGE_EXTENSIONS, caption_file
from ldm_pipeline.files import write_atomically
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


def _readable(folder: Path, resolution: int, default: str) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The images already in ``folder`` (square-cropped to ``resolution``), their captions (a
    same-name ``.txt``, else ``default``) and the unreadable ones."""
    arrays, captions, unreadable = [], [], []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for path in files:
        try:
            arrays.append(fit_to_bucket(decode_image(str(path)), (resolution, resolution)))
        except SkippedImage as err:
            unreadable.append(f"{path}: {err.reason}")
            continue
        caption, problem = caption_file(path)
        if problem:
            arrays.pop()
            unreadable.append(f"{path}: {problem}")
            continue
        captions.append(caption or default)
    return arrays, captions, unreadable


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
    settings, prompts = _settings(cfg), cfg.unet.dreambooth.class_prompts
    extra = {"guidance_scale": settings["guidance_scale"]} if settings["guidance_scale"] is not None else {}
    for start in tqdm(range(0, len(paths), _BATCH), desc="class images", leave=False):
        chunk = paths[start : start + _BATCH]
        # Image k: prompt k mod the number of prompts, seed offset k; the same image on every rerun.
        numbers = [int(p.stem.split("-")[-1]) for p in chunk]
        seeds = [torch.Generator().manual_seed(settings["seed"] + k) for k in numbers]
        texts = [prompts[k % len(prompts)] for k in numbers]
        with accelerator.autocast():
            images = pipe(
                texts,
                height=settings["resolution"],
                width=settings["resolution"],
                num_inference_steps=settings["steps"],
                generator=seeds,
                **extra,
            ).images
        for image, text, path in zip(images, texts, chunk, strict=True):
            caption = path.with_suffix(".txt")
            write_atomically(caption, lambda tmp, text=text: tmp.write_text(text + "\n", encoding="utf-8"))
            write_atomically(path, image.save)


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
        prompts = cfg.unet.dreambooth.class_prompts
        arrays, captions, unreadable = _readable(folder, resolution, prompts[0])
        missing = db.num_class_images - len(arrays)
        if missing > 0 and accelerator.is_main_process:
            if unet is None:
                unet = load_component(UNet2DConditionModel, cfg.unet.pretrained, "unet", cfg.allow_pickle)
            _draw(cfg, parts, unet, sampler, _free_names(folder, missing), accelerator)
            (folder / "settings.json").write_text(json.dumps(settings, indent=2))
            generated = missing
            arrays, captions, unreadable = _readable(folder, resolution, prompts[0])
    del unet
    arrays, captions = arrays[: db.num_class_images], captions[: db.num_class_images]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    pixels = Pixels(images, [[caption] for caption in captions])
    named = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts ({prompts[0]!r}, ...)"
    summary = f"{len(arrays)} class images of {named}"
    return ClassImages(ImageSet([pixels], summary=summary), folder, generated, len(arrays) - generated, unreadable)
