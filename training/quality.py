"""What the stages measure while they train, so that a run knows when it is done.

``vae``: the held-out images' reconstruction PSNR (dB). ``unet``: prompt adherence of the EMA
weights on a fixed set of prompts from the built-in dataset's caption grammar, sampled with the
pipeline's own defaults (the sampler, steps and guidance the saved model uses) and read by the
dataset's analyser (`ldm_pipeline.evaluation`): all-correct for shapes, digit accuracy for
digits; for emoji, the run's own CLIP evaluator's R-precision on training emoji and the skin tone
drawn for the held-out (emoji, skin tone) pairs (`ldm_pipeline.evaluation.emoji`). The prompts
use a seed of their own, so that the final evaluation (seed 0) is not the set the run stopped on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ldm_pipeline.evaluation import fit_digit_classifier, generate, load_clip, prompt_adherence
from ldm_pipeline.evaluation.metrics import vae_reconstruction_psnr
from ldm_pipeline.pipeline import LatentDiffusionPipeline
from ldm_pipeline.schedulers import sampling_defaults

from .data import ImageSet
from .loop import QualityCheck

# The quality prompts' seed: not the final evaluation's (0) nor the benchmarks' (1).
QUALITY_SEED = 10_000


def psnr_check(
    vae: AutoencoderKL, holdout: ImageSet, every: int, target: float | None, decay_at: float | None = None
) -> QualityCheck:
    """Held-out reconstruction PSNR of ``vae`` (the posterior mean decoded), over every bucket."""

    @torch.no_grad()
    def measure() -> float:
        total = sum(len(p) * vae_reconstruction_psnr(vae, p.float_batch(torch.arange(len(p)))) for p in holdout.buckets)
        return total / len(holdout)

    return QualityCheck("psnr", measure, every, target, decay_at, fmt="{:.2f} dB")


def adherence_check(
    dataset: str,
    pipeline: Callable[[], AbstractContextManager[LatentDiffusionPipeline]],
    num_prompts: int,
    every: int,
    target: float | None,
    decay_at: float | None = None,
) -> QualityCheck:
    """Adherence on ``num_prompts`` fixed prompts of ``dataset``, sampled from the pipeline that
    the context ``pipeline()`` holds (with the weights to measure in place)."""
    classifier: list = []

    @torch.no_grad()
    def measure() -> float:
        with pipeline() as pipe:
            if dataset == "digits" and not classifier:
                classifier.append(fit_digit_classifier(pipe.default_size))
            scores, _, _ = prompt_adherence(
                pipe,
                dataset,
                num_prompts,
                QUALITY_SEED,
                batch_size=num_prompts,
                digit_classifier=classifier[0] if classifier else None,
                stratified=True,
                **sampling_defaults(pipe),  # an LCM student (unet.distill): its few steps
            )
        return scores["all_correct"]

    return QualityCheck("adherence", measure, every, target, decay_at, fmt="{:.3f}", window=2)


def emoji_check(
    pipeline: Callable[[], AbstractContextManager[LatentDiffusionPipeline]],
    clip_dir: Path,
    num_prompts: int,
    every: int,
    target: float | None,
    held_out_target: float | None,
    decay_at: float | None = None,
    candidates: int = 32,
) -> QualityCheck:
    """The emoji's R-precision (among ``candidates`` captions) on ``num_prompts`` fixed training emoji and
    the skin tone drawn for every held-out (emoji, tone) pair, judged by the run's CLIP model in
    ``clip_dir``; both are targets when set."""
    judge: list = []

    @torch.no_grad()
    def measure() -> dict[str, float]:
        with pipeline() as pipe:
            if not judge:  # the real emoji's features, once
                from ldm_pipeline.evaluation.emoji import EmojiJudge

                judge.append(EmojiJudge(*load_clip(clip_dir), pipe.default_size))
            j = judge[0]
            own, held = j.sample_rows(num_prompts, QUALITY_SEED), j.held_rows
            defaults = sampling_defaults(pipe)
            made = generate(pipe, j.prompts(own + held), QUALITY_SEED, batch_size=len(own), **defaults)
        return {
            "r_precision": j.adherence(made[: len(own)], own, candidates, QUALITY_SEED)["r_precision"],
            "held_out_skin_tone": j.held_out(made[len(own) :], held)["held_out_skin_tone"],
        }

    parts = {"held_out_skin_tone": held_out_target}
    return QualityCheck("r_precision", measure, every, target, decay_at, fmt="{:.3f}", window=2, parts=parts)
