"""Schedulers by name, and the predictor-corrector (Langevin) scheduler against hand computations."""

import numpy as np
import pytest
import torch
from conftest import seeded
from diffusers import DDPMScheduler, StableDiffusionPipeline

from ldm_pipeline.schedulers import SCHEDULERS, LangevinCorrectorScheduler, make_scheduler


def _run(pipe, steps=4):
    calls = []

    def count(_pipe, i, t, tensors):
        calls.append(int(t))
        return tensors

    images = pipe(
        "a red circle", num_inference_steps=steps, generator=seeded(3), output_type="np", callback_on_step_end=count
    ).images
    return images, calls


def test_every_named_scheduler_samples(pipe):
    own = pipe.scheduler.config
    for name in SCHEDULERS:
        pipe.scheduler = make_scheduler(name, own)
        # Latents are unbounded: a scheduler that clips its sample prediction to [-1, 1] ruins them.
        assert not pipe.scheduler.config.get("clip_sample", False), name
        images, _ = _run(pipe, steps=3)
        assert np.isfinite(images).all(), name
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        make_scheduler("nope", pipe.scheduler.config)


def test_without_corrector_steps_it_is_ddpm_ancestral_sampling(pipe):
    config = pipe.scheduler.config
    pipe.scheduler = LangevinCorrectorScheduler.from_config(config, corrector_steps=0)
    ours, calls = _run(pipe)
    pipe.scheduler = DDPMScheduler.from_config(config, clip_sample=False)
    reference, _ = _run(pipe)
    np.testing.assert_array_equal(ours, reference)
    assert len(calls) == 4


def test_corrector_steps_add_model_evaluations_at_the_same_timestep(pipe):
    pipe.scheduler = LangevinCorrectorScheduler.from_config(pipe.scheduler.config, corrector_steps=2)
    _, calls = _run(pipe, steps=4)
    base = [int(t) for t in pipe.scheduler.predictor.timesteps]
    assert calls == [base[0], *[t for t in base[1:] for _ in range(3)]]  # P, then C, C, P per timestep


def test_langevin_step_matches_the_hand_computation():
    scheduler = LangevinCorrectorScheduler(snr=0.2)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    t = 500
    a_bar, alpha = scheduler.alphas_cumprod[t], scheduler.alphas[t]
    score = -eps / (1 - a_bar).sqrt()
    expected = []
    for i in range(2):  # the step size is set per sample
        step = 2 * alpha * (0.2 * z[i].norm() / score[i].norm()) ** 2
        expected.append(x[i] + step * score[i] + (2 * step).sqrt() * z[i])
    torch.testing.assert_close(scheduler.langevin_step(eps, t, x, z), torch.stack(expected))
    # v-prediction is turned into the same ε first: ε = √ᾱ v + √(1-ᾱ) x.
    v = (eps - (1 - a_bar).sqrt() * x) / a_bar.sqrt()
    v_scheduler = LangevinCorrectorScheduler(snr=0.2, prediction_type="v_prediction")
    torch.testing.assert_close(v_scheduler.langevin_step(v, t, x, z), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_stock_diffusers_runs_it_with_the_same_images(tiny_dir, pipe):
    stock = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    for p in (pipe, stock):
        p.scheduler = LangevinCorrectorScheduler.from_config(p.scheduler.config, corrector_steps=1)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.5, "output_type": "np"}
    ours = pipe("a blue square", generator=seeded(1), **kwargs).images
    theirs = stock("a blue square", generator=seeded(1), **kwargs).images
    np.testing.assert_array_equal(ours, theirs)
