"""Each stage runs a few steps on tiny configs and writes outputs that load."""

import json
import math
import sys

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from ldm_pipeline.training.config import ConfigError, StageConfig
from ldm_pipeline.training.loop import make_accelerator, make_optimizer, run_loop
from ldm_pipeline.training.quickstart import quickstart_config
from ldm_pipeline.training.run import train
from ldm_pipeline.training.unet import trained_modules
from transformers import CLIPModel, CLIPTextModel

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.cli import main
from ldm_pipeline.errors import InputError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    overrides = [
        "vae.gan_start_step=1",
        "unet.validation_every_steps=2",
        "unet.gradient_accumulation_steps=2",
        "unet.gradient_checkpointing=true",
        "unet.memory_format=channels_last",  # the CUDA default; the CPU one is tested below
        "data.random_flip=true",
    ]
    report = train(quickstart_config(smoke=True, overrides=overrides), out)
    return out, report


@pytest.mark.slow
def test_stages_write_loadable_outputs(run_dir):
    out, report = run_dir
    assert set(report) >= {"vae", "clip", "unet"}
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.scaling_factor == report["vae"]["scaling_factor"]
    assert report["vae"]["steps"] == 3 and 0 < report["vae"]["psnr"] < 60
    assert any("g" in e for e in json.loads((out / "logs" / "vae_losses.json").read_text())["losses"])
    CLIPModel.from_pretrained(out / "clip")
    text = CLIPTextModel.from_pretrained(out / "text_encoder")
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    ours, trained = pipe.text_encoder.state_dict(), text.state_dict()
    assert ours.keys() == trained.keys() and all(torch.equal(ours[k], trained[k]) for k in ours)
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor
    stock = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    assert type(stock) is StableDiffusionPipeline and stock.unet.config == pipe.unet.config
    assert (out / "config.yaml").is_file()
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_run_logs_validation_grids_tensorboard_and_cache(run_dir):
    out, _ = run_dir
    assert [p.name for p in (out / "validation").iterdir()] == ["unet-step000002.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name.split("-")[0] for p in (out / "cache").iterdir()) == ["latents", "texts"]


@pytest.mark.slow
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
    with pytest.raises(InputError, match="run stage 'vae' first or set vae.pretrained"):
        train(quickstart_config(smoke=True), tmp_path, stages=["unet"])


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--smoke", "--output", str(tmp_path / "qs")]) == 0
    printed = capsys.readouterr().out
    assert f"pipeline: {tmp_path / 'qs' / 'pipeline'}" in printed and "ldm generate --model" in printed
    report = json.loads((tmp_path / "qs" / "eval.json").read_text())
    parts = [report[k] for k in ("color_accuracy", "shape_accuracy", "background_accuracy")]
    assert 0 <= report["all_correct"] <= min(parts) and max(parts) <= 1
    assert math.isfinite(report["clip_score"]) and 5 < report["psnr"] < 60
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


@pytest.mark.slow
def test_unet_snapshots_every_n_minutes(tmp_path, monkeypatch):
    # A clock that advances one minute per call makes every step a new training minute.
    ticks = iter(range(0, 10_000, 60))
    monkeypatch.setattr("ldm_pipeline.training.loop.time.monotonic", lambda: next(ticks))
    cfg = quickstart_config(smoke=True, overrides=["unet.snapshot_every_minutes=2", "stages=[vae, clip, unet]"])
    train(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names and all(int(n[5:8]) % 2 == 0 for n in names)
    UNet2DConditionModel.from_pretrained(tmp_path / "snapshots" / names[0])


@pytest.mark.parametrize(("steps", "expected"), [(None, range(55, 62)), (40, range(40, 41))])
def test_loop_fits_its_schedule_to_max_minutes(monkeypatch, steps, expected):
    # A clock that advances one second per call: about one second per step.
    ticks = iter(range(100_000))
    monkeypatch.setattr("ldm_pipeline.training.loop.time.monotonic", lambda: next(ticks))
    accelerator = make_accelerator("auto", seed=0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def loss(step):
        return {"loss": model(torch.ones(1, 2)).pow(2).sum()}

    cfg = StageConfig(steps=steps, warmup_steps=5, max_minutes=1)
    result = run_loop(accelerator, model, optimizer, loss, cfg, desc="t", log_every=1)
    assert result.steps in expected
    # The warm-up + cosine schedule ran its whole course: the last step's learning rate is ~0.
    assert result.losses[-1]["lr"] < 0.1 * 0.01


def test_steps_null_needs_max_minutes():
    with pytest.raises(ConfigError, match=r"unet.steps: null \(as many as fit\) needs unet.max_minutes"):
        quickstart_config(overrides=["unet.steps=null", "unet.max_minutes=null"])


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 give the gradient of one batch of 4 (mean losses)."""
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    grads = []
    for accumulate, batch in ((1, 4), (2, 2)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        accelerator = make_accelerator("no", seed=0)
        cfg = StageConfig(steps=1, warmup_steps=0, learning_rate=1e-3, gradient_accumulation_steps=accumulate)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        seen = []

        def loss(step, model=model, batch=batch, seen=seen):
            part = slice(len(seen) * batch, (len(seen) + 1) * batch)
            seen.append(part)
            return {"loss": (model(x[part]) - y[part]).pow(2).mean()}

        before = [p.detach().clone() for p in model.parameters()]
        cfg.max_grad_norm = 1e9
        run_loop(accelerator, model, optimizer, loss, cfg, desc="t", ema=None)
        grads.append([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
    for a, b in zip(*grads, strict=True):
        # fp32: two half-batches average to the whole batch's gradient; a missing 1/accumulation would be 2x off.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "polynomial"])
def test_lr_schedules_warm_up_and_run_their_course(name):
    model = torch.nn.Linear(2, 1)
    cfg = StageConfig(steps=20, warmup_steps=4, learning_rate=0.5, lr_scheduler=name)
    optimizer = make_optimizer(model.parameters(), cfg)
    accelerator = make_accelerator("auto", seed=0)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = run_loop(
        accelerator, model, optimizer, lambda s: {"loss": model(torch.ones(1, 2)).sum() * 0}, cfg, desc="t", log_every=1
    )
    lrs = [e["lr"] for e in result.losses]
    assert lrs[0] < lrs[3] <= 0.5  # warm-up
    assert (lrs[-1] < 0.05) == (name != "constant_with_warmup")


def test_fused_adamw_and_a_clear_error_without_bitsandbytes(monkeypatch):
    model = torch.nn.Linear(2, 1)
    assert make_optimizer(model.parameters(), StageConfig()).defaults["fused"] is True
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="adamw8bit needs bitsandbytes"):
        make_optimizer(model.parameters(), StageConfig(optimizer="adamw8bit"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["unet.prediction_type=v_prediction", "unet.zero_terminal_snr=true", "unet.loss=huber"],
        ["unet.prediction_type=sample", "unet.noise_offset=0.1", "unet.input_perturbation=0.1"],
        ["unet.noise_assignment=batch", "unet.input_perturbation=0.1"],
        ["unet.noise_assignment=knn", "unet.noise_candidates=3", "unet.noise_offset=0.1"],
    ],
)
def test_unet_objectives_train_and_configure_the_sampler(tmp_path, run_dir, overrides, monkeypatch):
    from ldm_pipeline.training import unet as unet_stage

    assigned = []
    for name in ("immiscible_noise", "nearest_noise"):
        real = getattr(unet_stage, name)
        monkeypatch.setattr(unet_stage, name, lambda *a, _real=real, _name=name: assigned.append(_name) or _real(*a))
    base, _ = run_dir
    cfg = quickstart_config(
        smoke=True,
        overrides=[f"vae.pretrained={base}", f"clip.pretrained={base}", "unet.timestep_range=[100, 900]"] + overrides,
    )
    report = train(cfg, tmp_path, stages=["unet"])
    assert report["unet"]["steps"] == 3 and report["unet"]["final_loss"] == report["unet"]["final_loss"]  # not NaN
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.scheduler.config.prediction_type == cfg.unet.prediction_type
    assert pipe.scheduler.config.rescale_betas_zero_snr == cfg.unet.zero_terminal_snr
    expected = {"none": set(), "batch": {"immiscible_noise"}, "knn": {"nearest_noise"}}[cfg.unet.noise_assignment]
    assert set(assigned) == expected  # each step's noise went through the configured assignment


@pytest.mark.parametrize(
    "memory_format, channels_last",
    [("channels_last", True), ("contiguous", False), ("auto", torch.cuda.is_available())],
)
def test_unet_memory_format(memory_format, channels_last):
    cfg = quickstart_config(smoke=True, overrides=[f"unet.memory_format={memory_format}"])
    weight = trained_modules(cfg, text_encoder=None).unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    with pytest.raises(ConfigError, match="memory_format"):
        quickstart_config(smoke=True, overrides=["unet.memory_format=nhwc"])


def test_each_random_stream_has_its_own_seed():
    from ldm_pipeline.training.seeds import OFFSETS, seed_of

    assert len(set(OFFSETS.values())) == len(OFFSETS)
    assert {seed_of(10, stream) for stream in OFFSETS} == {10 + offset for offset in OFFSETS.values()}
    with pytest.raises(KeyError):
        seed_of(0, "unet.nothing")
