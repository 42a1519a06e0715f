"""What the from-zero quality benchmarks share: train a shipped config, or take a finished run."""

from __future__ import annotations

import time
from pathlib import Path

from ldm_pipeline.training.config import load_config
from ldm_pipeline.training.run import train

from ldm_pipeline import LatentDiffusionPipeline


def trained_pipeline(
    config: Path, output: Path, run: Path | None, overrides: list[str], results: dict
) -> tuple[Path, LatentDiffusionPipeline]:
    """Train ``config`` into ``output`` (unless ``run`` is a finished run folder) and load its pipeline.

    Training adds ``train_report`` and ``train_wall_minutes`` to ``results``.
    """
    if run is None:
        run = output
        start = time.monotonic()
        results["train_report"] = train(load_config(config, overrides), run)
        results["train_wall_minutes"] = round((time.monotonic() - start) / 60, 2)
    pipe = LatentDiffusionPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return run, pipe
