"""Shapes adherence against UNet evaluations for the schedulers, on one trained pipeline.

Each (scheduler, steps) pair samples the same ``--num-samples`` prompts with the same seeds at
the pipeline's default guidance; the table reports all-correct adherence, the UNet evaluations
per image (steps × evaluations per step: 2 for Heun, 1 + corrector steps for the predictor-corrector
Langevin scheduler) and the seconds it took, all in one run on one machine.

Usage::

    python benchmarks/sampler_adherence.py --model runs/quickstart/pipeline \
        --out benchmarks/results/sampler-adherence.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.loading import load_pipeline
from ldm_pipeline.schedulers import LangevinCorrectorScheduler, make_scheduler

# (label, scheduler name, extra config, steps)
DEFAULT_GRID = [
    *[("dpm++", "dpm++", {}, s) for s in (10, 15, 20, 30, 50)],
    *[("unipc", "unipc", {}, s) for s in (10, 20)],
    *[("dpm++3m", "dpm++3m", {}, s) for s in (10, 20)],
    *[("ddim", "ddim", {}, s) for s in (20, 50)],
    *[("heun", "heun", {}, s) for s in (10,)],
    *[("euler-a", "euler-a", {}, s) for s in (10, 20, 50)],
    *[("dpm++sde", "dpm++sde", {}, s) for s in (20,)],
    *[("ddpm", "ddpm", {}, s) for s in (10, 20, 50)],
    *[(f"pc-langevin snr {snr}", "pc-langevin", {"snr": snr}, s) for snr in (0.05, 0.1) for s in (5, 10, 25)],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="prompt and noise seed")
    parser.add_argument("--schedulers", nargs="*", default=None, help="instead of the default grid: these names...")
    parser.add_argument("--steps", type=int, nargs="*", default=[10, 20], help="...at these step counts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid = DEFAULT_GRID if not args.schedulers else [(n, n, {}, s) for n in args.schedulers for s in args.steps]

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    rows = []
    for label, name, extra, steps in grid:
        pipe.scheduler = make_scheduler(name, own.config)
        if extra:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **extra)
        pipe.scheduler.set_timesteps(steps)
        evaluations = len(pipe.scheduler.timesteps)
        start = time.monotonic()
        metrics, _ = evaluate(pipe, "shapes", args.num_samples, seed=args.seed, num_inference_steps=steps)
        seconds = time.monotonic() - start
        corrector = isinstance(pipe.scheduler, LangevinCorrectorScheduler)
        rows.append(
            {
                "scheduler": label,
                "steps": steps,
                "unet_evaluations": evaluations,
                "all_correct": metrics["all_correct"],
                "seconds": round(seconds, 1),
                **({"corrector_steps": pipe.scheduler.config.corrector_steps} if corrector else {}),
            }
        )
        print(
            f"{label:24s} steps {steps:3d}  evals {evaluations:3d}  all-correct {metrics['all_correct']:.3f}  "
            f"{seconds:6.1f} s",
            flush=True,
        )
    pipe.scheduler = own
    if args.out:
        args.out.write_text(
            json.dumps({"model": str(args.model), "num_samples": args.num_samples, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
