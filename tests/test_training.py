"""Each stage runs a few steps on tiny configs and writes outputs that load."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.cli import main
from training.quickstart import quickstart_config
from training.run import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = train(quickstart_config(smoke=True, overrides=["vae.gan_start_step=1"]), out)
    return out, report


def test_stages_write_loadable_outputs(run_dir):
    out, report = run_dir
    assert set(report) >= {"vae", "clip", "unet"}
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.scaling_factor == report["vae"]["scaling_factor"]
    assert report["vae"]["steps"] == 3 and "psnr" in report["vae"]
    assert any("g" in e for e in json.loads((out / "logs" / "vae_losses.json").read_text())["losses"])
    CLIPModel.from_pretrained(out / "clip")
    text = CLIPTextModel.from_pretrained(out / "text_encoder")
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    ours, trained = pipe.text_encoder.state_dict(), text.state_dict()
    assert ours.keys() == trained.keys() and all(torch.equal(ours[k], trained[k]) for k in ours)
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor
    assert StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None) is not None
    assert (out / "config.yaml").is_file()
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_unet_stage_alone_reuses_run_folder_and_pretrained_vae(run_dir, tmp_path):
    out, _ = run_dir
    cfg = quickstart_config(
        smoke=True, overrides=[f"vae.pretrained={out / 'pipeline'}", f"clip.pretrained={out / 'pipeline'}"]
    )
    report = train(cfg, tmp_path, stages=["unet"])
    assert report["unet"]["steps"] == 3
    vae = AutoencoderKL.from_pretrained(tmp_path / "pipeline" / "vae")
    assert vae.config.scaling_factor == AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor


def test_unet_stage_without_earlier_stages_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 'vae' first or set vae.pretrained"):
        train(quickstart_config(smoke=True), tmp_path, stages=["unet"])


def test_quickstart_smoke_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--smoke", "--output", str(tmp_path / "qs")]) == 0
    printed = capsys.readouterr().out
    assert f"pipeline: {tmp_path / 'qs' / 'pipeline'}" in printed and "ldm generate --model" in printed
    report = json.loads((tmp_path / "qs" / "eval.json").read_text())
    for key in ("all_correct", "color_accuracy", "shape_accuracy", "background_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["clip_score"] is not None and report["psnr"] > 0
    assert (tmp_path / "qs" / "grid.png").is_file()


def test_train_cli_reports_bad_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("unet:\n  stepz: 3\n")
    assert main(["train", str(cfg), "--output", str(tmp_path / "o")]) == 2
    assert "unet.stepz: unknown key (did you mean 'steps'?)" in capsys.readouterr().err
    # Overrides after options are read as overrides, and checked the same way.
    cfg.write_text("model: tiny\n")
    assert main(["train", str(cfg), "--output", str(tmp_path / "o"), "vae.learning_rate=-1"]) == 2
    assert "vae.learning_rate: must be positive, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unet_snapshots_every_n_minutes(tmp_path, monkeypatch):
    # A clock that advances one minute per call makes every step a new training minute.
    ticks = iter(range(0, 10_000, 60))
    monkeypatch.setattr("training.loop.time.monotonic", lambda: next(ticks))
    cfg = quickstart_config(smoke=True, overrides=["unet.snapshot_every_minutes=2", "stages=[vae, clip, unet]"])
    train(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names and all(int(n[5:8]) % 2 == 0 for n in names)
    UNet2DConditionModel.from_pretrained(tmp_path / "snapshots" / names[0])
