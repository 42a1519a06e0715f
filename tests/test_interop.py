"""Saved folders follow the Stable Diffusion layout and give the same images in stock diffusers."""

import json

import numpy as np
import pytest
import torch
from conftest import seeded
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from safetensors import safe_open

from ldm_pipeline import LatentDiffusionPipeline

PROMPT = "a green triangle on a black background"


def _images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=5, guidance_scale=4.0, generator=seeded(3), output_type="np", **kw).images


def test_saved_folder_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    weights = sorted(p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(tiny_dir.rglob("*.bin"))
    assert (tiny_dir / "tokenizer" / "vocab.json").exists() and (tiny_dir / "tokenizer" / "merges.txt").exists()
    assert json.loads((tiny_dir / "vae" / "config.json").read_text())["scaling_factor"] == 1.0
    # Text weights keyed as in released Stable Diffusion checkpoints, so transformers 4 loads them too.
    with safe_open(tiny_dir / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)


def test_round_trip_gives_same_weights_and_images(pipe, tmp_path):
    before = _images(pipe)
    pipe.save_pretrained(tmp_path / "again")
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "again")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(_images(again), before)


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler])
def test_parity_with_stock_stable_diffusion(tiny_dir, scheduler_cls):
    ours = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    stock = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    assert type(stock) is StableDiffusionPipeline
    for p in (ours, stock):
        p.scheduler = scheduler_cls.from_config(p.scheduler.config)
    a, b = _images(ours), _images(stock)
    assert a.std() > 0.01  # the images are not flat, so equality is a real check
    assert np.abs(a - b).max() <= 1e-4
    a, b = _images(ours, negative_prompt="blue"), _images(stock, negative_prompt="blue")
    assert np.abs(a - b).max() <= 1e-4


def test_diffusion_pipeline_returns_stock_class(tiny_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_dir)
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None


def test_folder_saved_by_stock_pipeline_loads(pipe, tmp_path):
    stock = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.save_pretrained(tmp_path / "stock")
    ours = LatentDiffusionPipeline.from_pretrained(tmp_path / "stock")
    assert isinstance(ours, LatentDiffusionPipeline)
    assert np.abs(_images(ours) - _images(stock)).max() <= 1e-4


@pytest.mark.parametrize(
    "scheduler_cls",
    [
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        UniPCMultistepScheduler,
        PNDMScheduler,
    ],
)
def test_scheduler_swaps(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    a, b = _images(pipe), _images(pipe)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # seeded, even for the ancestral sampler
