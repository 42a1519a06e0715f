"""Latent consistency distillation as a UNet stage (``unet.distill``): the student, resume, and
loading the results in stock diffusers (training/distill.py)."""

import numpy as np
import pytest
import torch
import yaml
from conftest import resume_elsewhere, saved_unet
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from ldm_pipeline.training.config import ConfigError, config_from_dict, load_config
from ldm_pipeline.training.distill import lcm_student
from ldm_pipeline.training.run import train
from PIL import Image
from safetensors.torch import load_file

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.cli import main
from ldm_pipeline.hub import model_card
from ldm_pipeline.schedulers import sampling_defaults


def _config(teacher, lora: bool = False, **unet) -> object:
    data = {
        "model": "tiny",
        "pretrained": str(teacher),
        "stages": ["unet"],
        "report_to": "none",
        "mixed_precision": "no",
        "data": {"num_samples": 32, "resolution": 32, "holdout": 0},
        "unet": {
            "steps": 3,
            "batch_size": 8,
            "caption_dropout": 0.0,
            "warmup_steps": 0,
            "learning_rate": 1e-3,
            "validation_every_steps": None,
            "distill": {"guidance_scale": [1.5, 3.0]},
            **({"lora": {"rank": 4}} if lora else {}),
            **unet,
        },
    }
    return config_from_dict(data)


def _images(pipe, steps: int = 2, guidance: float = 2.5):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    return pipe(
        ["a red circle"], num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np"
    ).images


def test_the_full_student_starts_as_its_teacher_for_any_guidance(pipe):
    student = lcm_student(pipe.unet, 32)
    assert student.config.time_cond_proj_dim == 32
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    w = LatentDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([0.5, 7.0]), embedding_dim=32)
    with torch.no_grad():
        torch.testing.assert_close(
            student(x, t, text, timestep_cond=w).sample, pipe.unet(x, t, text).sample, rtol=1e-5, atol=1e-5
        )


def test_lcm_sampling_defaults_take_four_steps_and_guide_only_through_the_embedding(pipe):
    assert sampling_defaults(pipe) == {}
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    assert sampling_defaults(pipe) == {"num_inference_steps": 4, "guidance_scale": 1.0}  # an LCM-LoRA on its base
    pipe.unet = lcm_student(pipe.unet, 32)
    assert sampling_defaults(pipe) == {"num_inference_steps": 4}  # w goes in through the embedding


@pytest.mark.parametrize(
    ("unet", "message"),
    [
        ({"distill": {"guidance_scale": [3.0, 1.5]}}, r"unet.distill.guidance_scale: must be \[low, high\]"),
        ({"distill": {"target_ema": 1.0}}, r"unet.distill.target_ema: must be in \[0, 1\)"),
        ({"distill": {"teacher_steps": 0}}, r"unet.distill.teacher_steps: must be in 1..1000"),
        ({"distill": {"loss": "l1"}}, "unet.distill.loss: must be one of"),
        ({"distill": {"guidance_embedding_dim": 7}}, "unet.distill.guidance_embedding_dim: must be a positive even"),
        (
            {"distill": {}, "train_text_encoder": True},
            "unet.distill: not with unet.dreambooth or unet.train_text_encoder",
        ),
    ],
)
def test_distillation_config_errors_name_the_key(tiny_dir, unet, message):
    with pytest.raises(ConfigError, match=message):
        _config(tiny_dir, **unet)
    with pytest.raises(ConfigError, match="unet.distill: distils a trained model; set pretrained"):
        config_from_dict({"model": "tiny", "unet": {"distill": {}}})


@pytest.mark.slow
def test_the_full_lcm_loads_in_stock_latent_consistency_pipeline_with_the_same_images(tiny_dir, tmp_path):
    report = train(_config(tiny_dir), tmp_path / "run")
    assert report["unet"]["steps"] == 3 and report["unet"]["final_loss"] > 0
    folder = tmp_path / "run" / "pipeline"
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(ours.scheduler, LCMScheduler) and ours.unet.config.time_cond_proj_dim == 256
    teacher = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    changed = [k for k, v in teacher.unet.state_dict().items() if not torch.equal(v, ours.unet.state_dict()[k])]
    assert changed  # the student trained
    stock = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    mine, theirs = _images(ours), _images(stock)
    assert mine.shape == theirs.shape and abs(mine - theirs).max() < 1e-4


@pytest.mark.slow
def test_the_lcm_lora_loads_in_stock_stable_diffusion_with_the_same_images(tiny_dir, tmp_path):
    train(_config(tiny_dir, lora=True), tmp_path / "run")
    lora = tmp_path / "run" / "lora"
    ours = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    ours.scheduler = LCMScheduler.from_config(ours.scheduler.config)
    ours.load_lora_weights(lora)
    stock = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    stock.load_lora_weights(lora)
    mine, theirs = _images(ours, guidance=1.0), _images(stock, guidance=1.0)
    assert abs(mine - theirs).max() < 1e-4
    plain = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    plain.scheduler = LCMScheduler.from_config(plain.scheduler.config)
    assert abs(_images(plain, guidance=1.0) - theirs).max() > 1e-3  # the adapters change the images
    stock.fuse_lora()
    assert abs(_images(stock, guidance=1.0) - theirs).max() < 1e-4
    # `ldm generate --scheduler lcm --lora`: 4 steps and no guidance batch unless asked.
    png = tmp_path / "lcm.png"
    argv = ["generate", "--model", str(tiny_dir), "--lora", str(lora), "--scheduler", "lcm", "--prompt", "a red circle"]
    assert main([*argv, "--seed", "3", "--out", str(png)]) == 0
    expected = stock(
        ["a red circle"], num_inference_steps=4, guidance_scale=1.0, generator=[torch.Generator().manual_seed(3)]
    )
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected.images[0]))


@pytest.mark.slow
def test_distillation_resumes_exactly_with_its_target_network(tiny_dir, tmp_path):
    cfg = _config(tiny_dir, steps=4, checkpoint_every=2, checkpoint_keep=3)
    train(cfg, tmp_path / "whole")
    step2 = tmp_path / "whole" / "checkpoints" / "unet" / "step-00000002"
    assert "lcm_target" in str(load_file(step2 / "state.safetensors").keys())
    resume_elsewhere(cfg, step2, tmp_path / "again")
    first, second = saved_unet(tmp_path / "whole"), saved_unet(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["lcm.yaml", "lcm-lora.yaml"])
def test_the_shipped_recipes_distil_a_pipeline_folder(tiny_dir, name):
    cfg = load_config(name, [f"pretrained={tiny_dir}"])
    assert cfg.unet.distill is not None and cfg.stages == ["unet"] and cfg.unet.caption_dropout == 0
    assert (cfg.unet.lora is not None) == (name == "lcm-lora.yaml")


def test_the_model_card_says_how_to_sample_a_distilled_model(tmp_path):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"pretrained": "me/base", "unet": {"distill": {}, "lora": {}}}))
    card = model_card(run / "lora", "me/lcm-lora")
    assert "LCMScheduler.from_config" in card and "num_inference_steps=4, guidance_scale=1.0" in card
    assert "- lcm" in card
