"""Fine-tuning a saved pipeline on a user folder: full and LoRA, broken files, diffusers-loadable LoRA."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import resume_elsewhere, saved_unet
from diffusers import StableDiffusionPipeline
from ldm_pipeline.training.config import ConfigError, config_from_dict
from ldm_pipeline.training.run import train
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.cli import main
from ldm_pipeline.loading import ModelLoadError


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """16 captioned images of three shapes, and one broken file of each kind."""
    folder = tmp_path_factory.mktemp("user") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    shapes = [(48, 24), (32, 32), (24, 48)]
    for i in range(16):
        w, h = shapes[i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo number {i}")
    full = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "words.png").write_text("not an image")
    (folder / "nocaption.png").write_bytes(full)
    for name in ("truncated", "empty", "words"):
        (folder / f"{name}.txt").write_text("a broken file")
    return folder


def _config(base, folder, **unet):
    return config_from_dict(
        {
            "model": "tiny",
            "pretrained": str(base),
            "stages": ["unet"],
            "report_to": "none",
            "data": {"source": str(folder), "bucketing": True, "max_skipped_fraction": 0.3},
            "unet": {"steps": 3, "batch_size": 2, "learning_rate": 0.01, **unet},
        }
    )


def _images(pipe, prompt="a photo number 3"):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, guidance_scale=2.5, generator=generator, output_type="np").images


@pytest.mark.slow
def test_full_finetune_from_a_saved_pipeline_skips_and_reports_broken_files(tiny_dir, user_folder, tmp_path):
    report = train(_config(tiny_dir, user_folder), tmp_path)
    assert report["unet"]["steps"] == 3 and report["unet"]["images"] == 16
    assert report["unet"]["buckets"] == {"24x44": 5, "32x32": 5, "44x24": 6}  # width x height: images
    skipped = [json.loads(line) for line in (tmp_path / "skipped_images.jsonl").read_text().splitlines()]
    reasons = {s["item"].rsplit("/", 1)[-1]: s["reason"] for s in skipped}
    assert set(reasons) == {"truncated.png", "empty.png", "words.png", "nocaption.png"}
    assert "truncated" in reasons["truncated.png"] and "zero-byte" in reasons["empty.png"]
    assert "not an image" in reasons["words.png"] and "no caption" in reasons["nocaption.png"]

    tuned = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    base = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed and all(torch.equal(v, base.vae.state_dict()[k]) for k, v in tuned.vae.state_dict().items())
    assert tuned.scheduler.config.beta_schedule == base.scheduler.config.beta_schedule
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None)
    np.testing.assert_array_equal(_images(stock), _images(tuned))


@pytest.mark.slow
def test_too_many_skipped_files_stop_the_run_after_writing_the_report(tiny_dir, user_folder, tmp_path):
    cfg = _config(tiny_dir, user_folder)
    # The header scan finds 3 of 20 unusable (15%): over 10%, the run stops before any encoding.
    cfg.data.max_skipped_fraction = 0.1
    with pytest.raises(ValueError, match=r"15.0% of the images were skipped, over data.max_skipped_fraction 10.0%"):
        train(cfg, tmp_path / "early")
    assert len((tmp_path / "early" / "skipped_images.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "early" / "cache").exists()
    # Under 18% it goes on; decoding for the cache finds the truncated file (20%) and stops.
    cfg.data.max_skipped_fraction = 0.18
    with pytest.raises(ValueError, match=r"20.0% of the images were skipped, over data.max_skipped_fraction 18.0%"):
        train(cfg, tmp_path)
    assert len((tmp_path / "skipped_images.jsonl").read_text().splitlines()) == 4
    assert not (tmp_path / "pipeline").exists()


@pytest.mark.slow
def test_lora_loads_in_stock_diffusers_with_the_same_images(tiny_dir, user_folder, tmp_path):
    lora = {"rank": 4, "alpha": 8}
    report = train(_config(tiny_dir, user_folder, lora=lora, train_text_encoder=True, learning_rate=0.05), tmp_path)
    weights = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)
    assert all(v.shape[0] == 4 or v.shape[1] == 4 for k, v in weights.items() if "lora" in k)
    assert report["unet"]["lora"] == str(tmp_path / "lora") and not (tmp_path / "pipeline").exists()

    ours = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    ours.load_lora_weights(tmp_path / "lora")
    stock = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    stock.load_lora_weights(tmp_path / "lora")
    with_lora = _images(ours)
    np.testing.assert_array_equal(_images(stock), with_lora)
    base = _images(LatentDiffusionPipeline.from_pretrained(tiny_dir))
    assert np.abs(with_lora - base).max() > 1e-3  # the adapters change the images
    args = ["generate", "--model", str(tiny_dir), "--prompt", "a photo number 3", "--steps", "2"]
    assert main([*args, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "lora.png")]) == 0
    assert main([*args, "--lora", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2  # not a LoRA folder


def test_finetune_config_errors_name_the_problem(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="pretrained: model folder not found"):
        config_from_dict({"pretrained": "./no/such/folder", "stages": ["unet"]})
    with pytest.raises(ConfigError, match="unet.lora.rank: must be positive"):
        config_from_dict({"pretrained": str(tiny_dir), "unet": {"lora": {"rank": 0}}})
    cfg = config_from_dict({"model": "tiny", "pretrained": str(tiny_dir), "data": {"source": str(tmp_path)}})
    assert cfg.unet.pretrained == cfg.vae.pretrained == str(tiny_dir) and cfg.data.resolution == 32
    assert cfg.data.holdout == 0


def test_train_cli_on_a_folder_with_nothing_usable_fails_clearly(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "a.txt").write_text("caption")
    config = tmp_path / "ft.yaml"
    config.write_text(
        f"model: tiny\npretrained: {tiny_dir}\nstages: [unet]\nreport_to: none\ndata:\n  source: {folder}\n"
    )
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 2
    assert "no usable image" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_from_a_pipeline_with_a_nan_in_a_frozen_part_is_refused(tiny_dir, user_folder, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    (path,) = (base / "vae").glob("*.safetensors")
    weights = load_file(path)
    weights["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, path)
    with pytest.raises(ModelLoadError, match=r"vae holds non-finite weights \(NaN or Inf\) in \['encoder.conv_in"):
        train(_config(base, user_folder), tmp_path / "run")
    assert not (tmp_path / "run" / "pipeline").exists()


@pytest.mark.slow
def test_finetune_from_a_stock_stable_diffusion_folder(user_folder, tmp_path):
    """A folder as StableDiffusionPipeline.save_pretrained writes it (PNDM scheduler, no safety checker)."""
    from diffusers import PNDMScheduler

    from ldm_pipeline import build_pipeline

    torch.manual_seed(0)
    parts = build_pipeline("tiny")
    schedule = {"beta_start": 0.001, "beta_end": 0.015, "beta_schedule": "scaled_linear", "skip_prk_steps": True}
    stock = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=PNDMScheduler(**schedule),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.save_pretrained(tmp_path / "sd")
    train(_config(tmp_path / "sd", user_folder), tmp_path / "run")
    tuned = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", safety_checker=None)
    # Trained and saved on the pretrained model's own noise schedule, not the preset's.
    assert (tuned.scheduler.config.beta_start, tuned.scheduler.config.beta_end) == (0.001, 0.015)
    assert _images(tuned).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name", ["finetune.yaml", "finetune-lora.yaml", "dreambooth.yaml", "dreambooth-lora.yaml"])
def test_example_finetune_configs_validate(name, tiny_dir, user_folder):
    from pathlib import Path

    from ldm_pipeline.training.config import load_config

    path = Path(__file__).parents[1] / "configs" / name
    cfg = load_config(path, [f"pretrained={tiny_dir}", f"data.source={user_folder}"])
    assert cfg.unet.pretrained == str(tiny_dir)
    assert cfg.data.bucketing or cfg.unet.dreambooth.class_prompt == "a photo of a dog"


@pytest.mark.slow
def test_full_finetune_can_train_the_text_encoder_too(tiny_dir, user_folder, tmp_path):
    train(_config(tiny_dir, user_folder, train_text_encoder=True), tmp_path)
    tuned = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    base = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    before = base.text_encoder.state_dict()
    changed = [k for k, v in tuned.text_encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert not list((tmp_path / "cache").glob("text*"))  # embeddings are computed each step, not cached


@pytest.mark.slow
def test_a_pretrained_model_with_another_prediction_type_is_not_silently_retargeted(tiny_dir, user_folder, tmp_path):
    import shutil

    base = tmp_path / "vpred"
    shutil.copytree(tiny_dir, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="predicts 'v_prediction': set unet.prediction_type: v_prediction"):
        train(_config(base, user_folder), tmp_path / "run")
    report = train(_config(base, user_folder, prediction_type="v_prediction"), tmp_path / "run2")
    tuned = LatentDiffusionPipeline.from_pretrained(tmp_path / "run2" / "pipeline")
    assert report["unet"]["steps"] == 3 and tuned.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.slow
def test_encoding_in_the_loop_trains_writes_no_latent_cache_and_resumes_exactly(tiny_dir, user_folder, tmp_path):
    cfg = _config(tiny_dir, user_folder, steps=4, checkpoint_every=2, checkpoint_keep=3)
    cfg.data.cache = "none"
    cfg.data.random_flip = True
    whole = train(cfg, tmp_path / "whole")
    assert whole["unet"]["steps"] == 4 and whole["unet"]["images"] == 17  # the truncated file is not found yet
    assert not list((tmp_path / "whole" / "cache").glob("latent-shards-*"))
    step2 = tmp_path / "whole" / "checkpoints" / "unet" / "step-00000002"
    assert step2.is_dir()
    resume_elsewhere(cfg, step2, tmp_path / "again")
    first, second = saved_unet(tmp_path / "whole"), saved_unet(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)
