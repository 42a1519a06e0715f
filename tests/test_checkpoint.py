"""Checkpoints: atomic writes, exact resume after SIGKILL, non-finite guard, clear errors."""

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ldm_pipeline.training import checkpoint
from ldm_pipeline.training.checkpoint import (
    COMPLETE,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ldm_pipeline.training.config import ConfigError, StageConfig
from ldm_pipeline.training.loop import Checkpoints, NonFiniteError, make_accelerator, make_optimizer, run_loop
from ldm_pipeline.training.quickstart import quickstart_config
from ldm_pipeline.training.run import train
from safetensors.torch import load_file

from ldm_pipeline.cli import main

HELPER = Path(__file__).parent / "helpers" / "killable_run.py"


def _state(value: float = 1.0) -> dict:
    return {
        "weights": {"a": torch.full((3, 2), value), "b": torch.arange(4)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.99), "lr": 1e-3}]},
        "rng": torch.get_rng_state(),
        "loop": {"step": 7, "losses": [{"loss": 0.5}], "note": None},
    }


def test_state_round_trips_exactly_without_pickle(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path, 7, state, keep=2, meta={"stage": "unet"})
    assert sorted(p.name for p in path.iterdir()) == [COMPLETE, "state.json", "state.safetensors"]
    step, loaded, meta = load_checkpoint(path)
    assert step == 7 and meta == {"stage": "unet"}
    assert torch.equal(loaded["weights"]["a"], state["weights"]["a"]) and loaded["weights"]["b"].dtype == torch.int64
    assert loaded["optimizer"]["state"][0]["step"] == 3.0 and loaded["optimizer"]["param_groups"][0]["betas"] == (
        0.9,
        0.99,
    )
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["loop"] == state["loop"]


def test_pruning_keeps_the_newest_and_latest_skips_incomplete(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    incomplete = tmp_path / "step-00000008"
    incomplete.mkdir()
    (incomplete / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(incomplete)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint_under_its_name(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, _state(2), keep=1)

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "state.safetensors").unlink()  # the first file is gone when the kill lands
        raise _Killed

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 4, _state(4), keep=1)
    monkeypatch.undo()
    steps = sorted(p for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert [p.name for p in steps] == ["step-00000004"]  # step 2 left its step-* name before deletion began
    for path in steps:  # every folder under a step-* name is whole
        assert sorted(p.name for p in path.iterdir()) == [COMPLETE, "state.json", "state.safetensors"], path
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    save_checkpoint(tmp_path, 6, _state(6), keep=1)  # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006"]


def test_a_checkpoint_missing_a_file_is_not_complete(tmp_path):
    path = save_checkpoint(tmp_path, 2, _state(), keep=2)
    (path / "state.safetensors").unlink()  # e.g. half deleted by an older release's pruning
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"state.safetensors missing \(half deleted\?\)"):
        load_checkpoint(path)


def test_failed_or_impossible_writes_leave_earlier_checkpoints_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, _state(), keep=1)

    def disk_full(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(
        CheckpointError, match=r"step 4: writing the checkpoint .* failed \(No space left on device\); earlier"
    ):
        save_checkpoint(tmp_path, 4, _state(), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    monkeypatch.undo()

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(CheckpointError, match="step 6: not enough disk space .* 0 MiB are free"):
        save_checkpoint(tmp_path, 6, _state(), keep=1)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"non-finite values in \['state.weights.a'\]"):
        save_checkpoint(tmp_path, 8, _state(float("nan")), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_corrupt_checkpoint_files_give_clear_errors(tmp_path):
    path = save_checkpoint(tmp_path, 2, _state(), keep=2)
    data = (path / "state.safetensors").read_bytes()
    (path / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 4, _state(), keep=2)
    (path / "state.json").write_text('{"step": 4, "state": ')
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_checkpoint(path)


def _loop_setup(losses):
    accelerator = make_accelerator("auto", seed=0)
    model = torch.nn.Linear(2, 1)
    cfg = StageConfig(steps=len(losses), warmup_steps=0, lr_scheduler="constant", max_nonfinite_steps=2)
    optimizer = make_optimizer(model.parameters(), cfg)
    model, optimizer = accelerator.prepare(model, optimizer)

    def compute_loss(step):
        out = model(torch.ones(1, 2)).sum()
        return {"loss": out * losses[step]}

    return accelerator, model, optimizer, compute_loss, cfg


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_consecutive():
    nan = float("nan")
    accelerator, model, optimizer, compute_loss, cfg = _loop_setup([1.0, nan, 1.0, float("inf"), 1.0])
    before = [p.detach().clone() for p in model.parameters()]
    result = run_loop(accelerator, model, optimizer, compute_loss, cfg, desc="t", log_every=1)
    assert result.steps == 5 and result.skipped == 2 and result.losses[-1]["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    accelerator, model, optimizer, compute_loss, cfg = _loop_setup([1.0, nan, nan, nan, 1.0])
    with pytest.raises(NonFiniteError, match="3 steps in a row up to step 4 had a non-finite loss"):
        run_loop(accelerator, model, optimizer, compute_loss, cfg, desc="t")


def _run(out: Path, *args: str) -> int:
    return subprocess.run([sys.executable, str(HELPER), str(out), *args], capture_output=True).returncode


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """Every weight of the saved pipeline and the final raw UNet state, as tensors."""
    state = {}
    for part in ("unet", "vae", "text_encoder"):
        for key, value in load_file(next((out / "pipeline" / part).glob("*.safetensors"))).items():
            state[f"{part}.{key}"] = value
    _, raw, _ = load_checkpoint(latest_checkpoint(out / "checkpoints" / "unet"))
    state.update({f"raw.{k}": v for k, v in raw["model"].items()})
    state.update({f"adam.{k}.{n}": v for k, s in raw["optimizer"]["state"].items() for n, v in s.items()})
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert _run(out) == 0
    return _final_state(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill",
    [
        # Optimiser steps are counted over the run: VAE 1-10 (its discriminator steps from its
        # step 3), CLIP 11-15, UNet 16-22.
        ["--kill-at-step", "5"],  # VAE step 4 of 6, after its checkpoint at step 2
        ["--kill-in-write", "2"],  # while writing the VAE's second checkpoint
        ["--kill-at-step", "20"],  # UNet step 5 of 7, VAE and CLIP finished
    ],
    ids=["vae-step", "vae-write", "unet-step"],
)
def test_resume_after_sigkill_is_bit_identical(kill, uninterrupted, tmp_path):
    assert _run(tmp_path, *kill) == -signal.SIGKILL
    assert not (tmp_path / "pipeline").exists()
    assert _run(tmp_path, "--resume", "latest") == 0
    resumed = _final_state(tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, different[:5]
    for stage in ("vae", "clip", "unet"):
        assert not list((tmp_path / "checkpoints" / stage).glob(".tmp-*"))


@pytest.mark.slow
def test_resume_refuses_a_config_that_changes_the_maths(tmp_path):
    cfg = quickstart_config(smoke=True, overrides=["report_to=none", "vae.steps=2", "clip.steps=2", "unet.steps=2"])
    train(cfg, tmp_path)
    changed = quickstart_config(
        smoke=True,
        overrides=["report_to=none", "vae.steps=2", "clip.steps=2", "unet.steps=2", "unet.learning_rate=0.5"],
    )
    with pytest.raises(ConfigError, match=r"unet.learning_rate: 0.001 -> 0.5.*--force-resume"):
        train(changed, tmp_path, resume="latest")
    report = train(changed, tmp_path, resume="latest", force_resume=True)
    assert json.loads((tmp_path / "train_report.json").read_text())["unet"]["steps"] == report["unet"]["steps"]
    with pytest.raises(ConfigError, match="holds no run"):
        train(cfg, tmp_path / "elsewhere", resume="latest")
    (tmp_path / "config.yaml").write_text("unet: {steps: 2\n")  # a hand edit gone wrong
    with pytest.raises(ConfigError, match=r"resume: the run's own config is broken: .*config.yaml, line 2, column 1"):
        train(cfg, tmp_path, resume="latest")
    (tmp_path / "config.yaml").write_text("[]\n")
    with pytest.raises(ConfigError, match="config.yaml is not a run config"):
        train(cfg, tmp_path, resume="latest")


@pytest.mark.slow
def test_export_turns_a_checkpoint_into_the_pipeline_the_run_saved(tmp_path, capsys):
    cfg = quickstart_config(smoke=True, overrides=["report_to=none", "vae.steps=2", "clip.steps=2", "unet.steps=3"])
    train(cfg, tmp_path / "run")
    step = latest_checkpoint(tmp_path / "run" / "checkpoints" / "unet")
    assert step.name == "step-00000003"
    assert main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "exported")]) == 0
    assert f"wrote {tmp_path / 'exported' / 'pipeline'}" in capsys.readouterr().out
    for part in ("unet", "vae", "text_encoder"):
        final = load_file(next((tmp_path / "run" / "pipeline" / part).glob("*.safetensors")))
        exported = load_file(next((tmp_path / "exported" / "pipeline" / part).glob("*.safetensors")))
        assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final), part
    vae_step = latest_checkpoint(tmp_path / "run" / "checkpoints" / "vae")
    assert main(["export", "--checkpoint", str(vae_step), "--output", str(tmp_path / "x")]) == 2


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    state = _state()
    state["rng"] = {"torch": torch.stack([torch.get_rng_state()] * 2)}
    path = save_checkpoint(tmp_path, 2, state, keep=1)
    accelerator, model, optimizer, compute_loss, cfg = _loop_setup([1.0, 1.0])
    ckpt = Checkpoints(tmp_path, None, 1, resume=path)
    with pytest.raises(CheckpointError, match="written by 2 process\\(es\\); this run has 1: resume with 2"):
        run_loop(accelerator, model, optimizer, compute_loss, cfg, desc="t", checkpoints=ckpt)
