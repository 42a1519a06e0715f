"""Latent consistency distillation of a finished run: what it costs and how close it samples to the teacher.

Distils the teacher run's pipeline with the shipped recipes (configs/lcm.yaml, and with
``--lora`` configs/lcm-lora.yaml) and scores, on the same prompts and seeds in one run:

- the teacher at its defaults (20 DPM-Solver++ steps, guidance 2.5): the baseline;
- the full student (LCMScheduler, the embedded guidance) and the LCM-LoRA on the teacher
  (guidance 1, no guidance batch) at each of ``--steps``;
- the cost: the distillation's wall and training minutes against the teacher's training minutes
  (its train_report.json; ``--teacher-wall-minutes`` adds the teacher command's wall time).

``--grid`` writes the first ``--grid-images`` images of each row (teacher, then each student at
each step count) as one PNG: the same prompts and seeds in every column.

Usage::

    ldm quickstart --output runs/quickstart
    python benchmarks/lcm_quality.py --teacher runs/quickstart --output runs/bench-lcm --lora \\
        --grid benchmarks/results/lcm-grid.png --out benchmarks/results/lcm-quality.json
    # the emoji model: --dataset emoji model=emoji data.name=emoji unet.eval_every=null unet.target=null
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ldm_pipeline.configs import shipped
from ldm_pipeline.training.config import load_config
from ldm_pipeline.training.run import train
from PIL import Image

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.images import image_grid
from ldm_pipeline.loading import load_lora
from ldm_pipeline.schedulers import make_scheduler, sampling_defaults


def _distil(recipe: str, teacher: Path, output: Path, overrides: list[str]) -> dict:
    """Train ``configs/<recipe>.yaml`` on ``teacher``'s pipeline into ``output``; its report and wall time."""
    cfg = load_config(shipped(f"{recipe}.yaml"), [f"pretrained={teacher / 'pipeline'}", "report_to=none", *overrides])
    start = time.monotonic()
    report = train(cfg, output)
    return {"train_report": report, "wall_minutes": round((time.monotonic() - start) / 60, 2)}


def _training_minutes(report: dict) -> float:
    """The minutes a run's stages trained (its train_report.json: each stage's ``minutes``)."""
    return sum(s["minutes"] for s in report.values() if isinstance(s, dict) and "minutes" in s)


def _score(pipe: LatentDiffusionPipeline, args: argparse.Namespace, **kwargs) -> tuple[dict, list[Image.Image]]:
    pipe.set_progress_bar_config(disable=True)
    call = {**sampling_defaults(pipe), **kwargs}
    clip = args.teacher / "clip"  # the run's CLIP evaluator, as `ldm eval` finds it (emoji's R-precision)
    clip_dir = clip if (clip / "config.json").is_file() else None
    metrics, images = evaluate(pipe, args.dataset, args.num_samples, args.seed, clip_dir, **call)
    metrics["sampling"] = call
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict | list)}), flush=True)
    return metrics, images[: args.grid_images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", type=Path, required=True, help="a finished run folder (its pipeline/ and train_report.json)"
    )
    parser.add_argument("--output", type=Path, default=Path("runs/bench-lcm"), help="the distilled runs go in here")
    parser.add_argument("--lora", action="store_true", help="also distil and score an LCM-LoRA (configs/lcm-lora.yaml)")
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "digits", "emoji"])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 2])
    parser.add_argument(
        "--teacher-wall-minutes", type=float, default=None, help="the teacher command's measured wall time"
    )
    parser.add_argument("--grid", type=Path, default=None, help="write the teacher-against-students grid here")
    parser.add_argument("--grid-images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides for both recipes, key=value")
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher_report = json.loads((args.teacher / "train_report.json").read_text())
    teacher_minutes = _training_minutes(teacher_report)
    results: dict = {
        "teacher": {"run": str(args.teacher), "training_minutes": round(teacher_minutes, 2)},
        "dataset": args.dataset,
        "num_samples": args.num_samples,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.teacher_wall_minutes is not None:
        results["teacher"]["wall_minutes"] = args.teacher_wall_minutes

    recipes = ["lcm", "lcm-lora"] if args.lora else ["lcm"]
    for recipe in recipes:
        made = _distil(recipe, args.teacher, args.output / recipe, args.overrides)
        made["training_minutes"] = round(_training_minutes(made["train_report"]), 2)
        made["training_over_teacher"] = round(made["training_minutes"] / teacher_minutes, 3)
        if args.teacher_wall_minutes is not None:
            made["wall_over_teacher_wall"] = round(made["wall_minutes"] / args.teacher_wall_minutes, 3)
        results[recipe] = made
        print(recipe, {k: v for k, v in made.items() if k != "train_report"}, flush=True)

    rows: list[list[Image.Image]] = []
    teacher = LatentDiffusionPipeline.from_pretrained(args.teacher / "pipeline")
    results["teacher"]["scores"], images = _score(teacher, args)
    rows.append(images)
    student = LatentDiffusionPipeline.from_pretrained(args.output / "lcm" / "pipeline")
    for steps in args.steps:
        results["lcm"][f"scores_{steps}_steps"], images = _score(student, args, num_inference_steps=steps)
        rows.append(images)
    if args.lora:
        load_lora(teacher, args.output / "lcm-lora" / "lora")
        teacher.scheduler = make_scheduler("lcm", teacher.scheduler.config)
        for steps in args.steps:
            results["lcm-lora"][f"scores_{steps}_steps"], images = _score(teacher, args, num_inference_steps=steps)
            rows.append(images)

    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid([image for row in rows for image in row], cols=args.grid_images, scale=2).save(args.grid)
        results["grid_rows"] = ["teacher (defaults)"] + [f"{r}, {s} steps" for r in recipes for s in args.steps]
        print(f"wrote {args.grid}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
