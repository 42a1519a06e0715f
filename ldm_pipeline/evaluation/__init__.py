"""Evaluate a pipeline on a built-in dataset: prompt adherence, CLIP score, VAE PSNR.

``evaluate`` samples prompts from the dataset's caption grammar, generates one image per prompt
at the pipeline's default steps and guidance (unless told otherwise), and scores the images
against the labels the prompts came from.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import load_builtin
from ..data import shapes as shapes_data
from ..data.digits import TEMPLATES as DIGIT_TEMPLATES
from ..data.digits import caption as digit_caption
from ..errors import InputError
from ..loading import load_model
from ..pipeline import LatentDiffusionPipeline
from .metrics import clip_score, vae_reconstruction_psnr
from .shapes import adherence


def shapes_prompts(num: int, seed: int, stratified: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """``num`` prompts drawn from the shapes grammar, with the labels each asks for.

    ``stratified``: every shape × colour × background combination in turn (in an order shuffled
    by ``seed``, each with a random wording), so that a few prompts cover them all evenly.
    """
    rng = random.Random(seed)
    combos = list(itertools.product(shapes_data.SHAPES, shapes_data.COLORS, shapes_data.BACKGROUNDS))
    rng.shuffle(combos)
    prompts, labels = [], []
    for i in range(num):
        lab = shapes_data.sample_labels(rng)
        if stratified:
            lab.update(zip(("shape", "color", "background"), combos[i % len(combos)], strict=True))
        prompts.append(shapes_data.caption(lab["shape"], lab["color"], lab["background"], lab["template"]))
        labels.append({k: lab[k] for k in ("shape", "color", "background")})
    return prompts, labels


def digit_prompts(num: int, seed: int) -> tuple[list[str], list[int]]:
    """``num`` digit prompts (each digit equally often) and the digit each asks for."""
    rng = random.Random(seed)
    digits = [i % 10 for i in range(num)]
    return [digit_caption(d, rng.randrange(len(DIGIT_TEMPLATES))) for d in digits], digits


@torch.no_grad()
def generate(
    pipe: LatentDiffusionPipeline, prompts: list[str], seed: int, batch_size: int = 32, **kwargs
) -> list[Image.Image]:
    """One image per prompt, in batches; image i always uses seed ``seed + i``."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images += pipe(batch, generator=generators, **kwargs).images
    return images


def to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images to ``[N, 3, H, W]`` floats in [-1, 1], optionally resized to ``size``."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size)) if size else im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def fit_digit_classifier(resolution: int, seed: int = 0):
    """An SVM on the real digits (8x8 grey thumbnails); returns it and its held-out accuracy."""
    from sklearn.svm import SVC

    ds = load_builtin("digits", resolution=resolution, seed=seed)
    x = _digit_features(list(ds["image"]))
    y = np.array(ds["digit"])
    cut = int(0.8 * len(y))
    held_out = SVC(gamma="scale").fit(x[:cut], y[:cut]).score(x[cut:], y[cut:])
    return SVC(gamma="scale").fit(x, y), float(held_out)


def _digit_features(images: list[Image.Image]) -> np.ndarray:
    return (
        np.stack([np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX)) for im in images])
        .reshape(len(images), -1)
        .astype(np.float32)
        / 255
    )


def prompt_adherence(
    pipe: LatentDiffusionPipeline,
    dataset: str = "shapes",
    num_samples: int = 200,
    seed: int = 0,
    batch_size: int = 32,
    digit_classifier=None,
    stratified: bool = False,
    **call_kwargs,
) -> tuple[dict, list[Image.Image], list[str]]:
    """Generate one image per prompt of the dataset's grammar and score it against its labels.

    Returns the scores (``all_correct``, ``color_accuracy``, ``shape_accuracy``,
    ``background_accuracy`` for shapes; ``digit_accuracy`` and ``all_correct`` equal to it for
    digits), the images and the prompts. ``digit_classifier``: a fitted `fit_digit_classifier`
    result to reuse (fitted here when None). ``stratified``: shapes prompts cover every
    combination evenly (`shapes_prompts`; digit prompts always cycle through the digits).
    """
    if num_samples <= 0:
        raise InputError(f"num_samples must be positive, got {num_samples}")
    if dataset == "shapes":
        prompts, labels = shapes_prompts(num_samples, seed, stratified)
        images = generate(pipe, prompts, seed, batch_size, **call_kwargs)
        return adherence(images, labels), images, prompts
    if dataset == "digits":
        prompts, digits = digit_prompts(num_samples, seed)
        images = generate(pipe, prompts, seed, batch_size, **call_kwargs)
        classifier, classifier_accuracy = digit_classifier or fit_digit_classifier(pipe.default_size)
        accuracy = float(np.mean(classifier.predict(_digit_features(images)) == np.array(digits)))
        scores = {"digit_accuracy": accuracy, "all_correct": accuracy}
        return {**scores, "classifier_accuracy_on_real": classifier_accuracy}, images, prompts
    raise InputError(f"unknown evaluation dataset {dataset!r}; use 'shapes' or 'digits'")


def load_clip(clip_dir: str | Path):
    """A run's CLIP evaluator (its ``clip/`` folder): the model, loaded strictly, and its tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    return load_model(CLIPModel, str(clip_dir)), CLIPTokenizer.from_pretrained(clip_dir)


def _evaluate_emoji(pipe, num_samples, seed, clip_dir, batch_size, **call_kwargs) -> tuple[dict, list[Image.Image]]:
    from .emoji import emoji_metrics

    if clip_dir is None:
        raise InputError("the emoji measures use the run's CLIP evaluator: pass --clip (the run's clip/ folder)")
    clip, tokenizer = load_clip(clip_dir)
    made: list[Image.Image] = []

    def generate_images(prompts: list[str], at_seed: int) -> list[Image.Image]:
        images = generate(pipe, prompts, at_seed, batch_size, **call_kwargs)
        made.extend(images)
        return images

    report = emoji_metrics(generate_images, clip, tokenizer, pipe.default_size, num_samples, seed)
    real = load_builtin("emoji", num_samples=256, seed=seed, resolution=pipe.default_size)
    report |= {"num_samples": num_samples, "seed": seed}
    report["psnr"] = vae_reconstruction_psnr(pipe.vae, to_tensor(list(real["image"]), pipe.default_size))
    return report, made


def evaluate(
    pipe: LatentDiffusionPipeline,
    dataset: str = "shapes",
    num_samples: int = 200,
    seed: int = 0,
    clip_dir: str | Path | None = None,
    batch_size: int = 32,
    **call_kwargs,
) -> tuple[dict, list[Image.Image]]:
    """Score a pipeline on ``shapes`` or ``digits``; returns the metrics and the images scored.

    Metric keys: ``all_correct``, ``color_accuracy``, ``shape_accuracy``, ``background_accuracy``
    (shapes) or ``digit_accuracy`` (digits, with ``all_correct`` equal to it), all fractions in
    [0, 1]; ``clip_score`` (with a CLIP evaluator folder, else None); ``psnr`` (VAE reconstructions of real images, dB).
    """
    size = pipe.default_size
    if dataset == "emoji":
        return _evaluate_emoji(pipe, num_samples, seed, clip_dir, batch_size, **call_kwargs)
    report: dict = {"dataset": dataset, "num_samples": num_samples, "seed": seed}
    scores, images, prompts = prompt_adherence(pipe, dataset, num_samples, seed, batch_size, **call_kwargs)
    report.update(scores)
    if dataset == "shapes":
        real = load_builtin("shapes", num_samples=min(num_samples, 256), seed=seed + 10_000, resolution=size)
    else:
        real = load_builtin("digits", num_samples=min(num_samples, 256), seed=seed, resolution=size)
    report["clip_score"] = None
    if clip_dir is not None:
        clip, tokenizer = load_clip(clip_dir)
        clip_size = clip.config.vision_config.image_size
        report["clip_score"] = clip_score(clip, tokenizer, to_tensor(images, clip_size), prompts)
        real_images = list(real["image"])
        report["clip_score_real_images"] = clip_score(
            clip, tokenizer, to_tensor(real_images, clip_size), list(real["text"])
        )
    report["psnr"] = vae_reconstruction_psnr(pipe.vae, to_tensor(list(real["image"]), size))
    return report, images
