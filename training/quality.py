"""What the stages measure while they train, so that a run knows when it is done.

``vae``: the held-out images' reconstruction PSNR (dB). ``unet``: prompt adherence of the EMA
weights on a fixed set of prompts from the built-in dataset's caption grammar, sampled with the
pipeline's own defaults (the sampler, steps and guidance the saved model uses) and read by the
dataset's analyser (`ldm_pipeline.evaluation`): all-correct for shapes, digit accuracy for
digits. The prompts use a seed of their own, so that the final evaluation (seed 0) is not the set
the run stopped on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from diffusers import AutoencoderKL

from ldm_pipeline.evaluation import fit_digit_classifier, prompt_adherence
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
