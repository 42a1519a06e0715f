"""``ldm quickstart``: train vae → clip → unet on shapes from zero, then sample and evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.images import image_grid
from ldm_pipeline.loading import load_pipeline

from .config import RunConfig, config_from_dict
from .run import train

GRID_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a black background",
    "a yellow triangle on a gray background",
    "a green circle on a black background",
    "a purple square on a white background",
    "a cyan triangle on a black background",
    "a red triangle on a gray background",
    "a green square on a white background",
)

# Seconds, not minutes: the tiny preset on a few images, for tests and a first look.
SMOKE = {
    "model": "tiny",
    "data": {"num_samples": 96, "resolution": 32, "holdout": 16},
    "vae": {"steps": 3, "batch_size": 8},
    "clip": {"steps": 3, "batch_size": 8},
    "unet": {"steps": 3, "batch_size": 8},
}


# The defaults are the shapes recipe; the VAE and UNet train for as many steps as fit in their
# minutes (the LR schedule fitted to the machine's pace), keeping the whole quick start within
# 30 minutes on a 2-core CPU. configs/shapes.yaml states the same run (a test checks they agree).
QUICKSTART = {
    "vae": {"steps": None, "max_minutes": 6},
    "clip": {"max_minutes": 1.5},
    "unet": {"steps": None, "max_minutes": 17},
}


def quickstart_config(smoke: bool = False, overrides: list[str] | None = None) -> RunConfig:
    """The quick start's config (the shapes recipe within the time budget), or the smoke version."""
    return config_from_dict(SMOKE if smoke else QUICKSTART, overrides)


def quickstart(
    out: str | Path = "runs/quickstart",
    smoke: bool = False,
    eval_samples: int | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Train every stage, write ``grid.png`` and ``eval.json`` and return the evaluation."""
    out = Path(out)
    cfg = quickstart_config(smoke, overrides)
    start = time.monotonic()
    report = train(cfg, out)
    train_minutes = (time.monotonic() - start) / 60

    pipe = load_pipeline(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    grid = pipe(list(GRID_PROMPTS), generator=[torch.Generator().manual_seed(i) for i in range(8)]).images
    # Small images are enlarged (nearest neighbour) to at least 128 pixels a side for viewing.
    image_grid(grid, cols=4, scale=max(1, 128 // grid[0].width)).save(out / "grid.png")

    metrics, _ = evaluate(pipe, "shapes", num_samples=eval_samples or (16 if smoke else 200), clip_dir=out / "clip")
    metrics.update(
        train_minutes=round(train_minutes, 2), total_minutes=round((time.monotonic() - start) / 60, 2), stages=report
    )
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics
