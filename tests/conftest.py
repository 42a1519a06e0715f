"""Shared fixtures: tiny models built in code, saved to temporary folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldm_pipeline import LatentDiffusionPipeline, build_pipeline


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test's Accelerator starts afresh: accelerate keeps one process-wide state, so the first
    test's mixed precision would otherwise hold for every later test in the process."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def no_traceback_switch(monkeypatch):
    """The tests of one-line errors hold in a shell that exported ``LDM_TRACEBACK=1`` (the switch
    that shows every traceback); a test that wants it sets it."""
    monkeypatch.delenv("LDM_TRACEBACK", raising=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A saved, untrained `tiny` pipeline with seeded weights."""
    torch.manual_seed(0)
    pipe = build_pipeline("tiny")
    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    pipe.save_pretrained(path)
    return path


@pytest.fixture
def pipe(tiny_dir) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def resume_elsewhere(cfg, checkpoint: Path, folder: Path) -> None:
    """Train ``cfg`` in a new run ``folder`` that holds only ``checkpoint`` (a stage's ``step-N``)
    and its run's config.yaml, resuming from it: what a run killed right after that checkpoint does."""
    from ldm_pipeline.training.run import train

    stage_dir = folder / "checkpoints" / checkpoint.parent.name
    stage_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, stage_dir / checkpoint.name)
    shutil.copy(checkpoint.parents[2] / "config.yaml", folder / "config.yaml")
    train(cfg, folder, resume=str(stage_dir / checkpoint.name))


def saved_unet(run: Path) -> dict[str, torch.Tensor]:
    """The UNet weights of a run's saved pipeline."""
    from safetensors.torch import load_file

    return load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))
