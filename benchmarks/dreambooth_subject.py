"""DreamBooth on the quick start's model: does a new subject appear, and do the old prompts still work?

The subject is a shape the model has never seen, drawn in code: a purple ring (a circle with a hole)
on white, five images of varied size and place, with no captions. The model is fine-tuned with
``unet.dreambooth`` (instance prompt "a purple sks circle on a white background") twice from the
same start: with prior preservation (class prompt "a purple circle on a white background") and
without. Each model, and the base, is then measured on

- **subject rate**: the share of 64 images of the instance prompt that are rings (the foreground's
  bounding box has an empty middle: its central ninth is under 30% foreground; a filled circle,
  square or triangle is 100%);
- **class rings**: the same share for the class prompt (language drift: the class should stay a
  filled circle);
- **adherence**: all-correct on 200 shapes prompts (seed 0), the shipped evaluator.

Usage::

    python benchmarks/dreambooth_subject.py --model runs/quickstart/pipeline --output runs/bench-dreambooth
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from ldm_pipeline.training.config import config_from_dict
from ldm_pipeline.training.run import train
from PIL import Image, ImageDraw

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.data.shapes import BACKGROUNDS, COLORS, SHAPES, TEMPLATES, caption
from ldm_pipeline.evaluation import evaluate, generate

INSTANCE = "a purple sks circle on a white background"
CLASS = "a purple circle on a white background"


def grammar_prompts() -> list[str]:
    """Every shape x colour x background of the built-in data, the wordings in turn (54 prompts)."""
    combos = [(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]
    return [caption(s, c, b, i % len(TEMPLATES)) for i, (s, c, b) in enumerate(combos)]


def draw_ring(size: int, x: int, y: int, resolution: int = 32, scale: int = 4) -> Image.Image:
    """A purple ring (outer diameter ``size``, hole 45% of it) with its box's corner at (x, y)."""
    canvas = Image.new("RGB", (resolution * scale,) * 2, BACKGROUNDS["white"])
    draw = ImageDraw.Draw(canvas)
    box = [x * scale, y * scale, (x + size) * scale - 1, (y + size) * scale - 1]
    draw.ellipse(box, fill=COLORS["purple"])
    inset = round(size * scale * 0.275)
    draw.ellipse([box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset], fill=BACKGROUNDS["white"])
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def is_ring(image: Image.Image) -> bool:
    """Whether the foreground (pixels far from the border's median colour) has an empty middle."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    mask = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) > 60
    if mask.sum() < 8:
        return False
    rows, cols = np.where(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    h, w = bottom - top, right - left
    middle = mask[top + h // 3 : bottom - h // 3, left + w // 3 : right - w // 3]
    return middle.size > 0 and middle.mean() < 0.3


def subject_folder(folder: Path, count: int = 5, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = rng.randint(18, 26)
        draw_ring(size, rng.randint(0, 32 - size), rng.randint(0, 32 - size)).save(folder / f"ring{i}.png")
    return folder


def ring_rate(pipe: LatentDiffusionPipeline, prompt: str, count: int = 64) -> float:
    images = generate(pipe, [prompt] * count, seed=0, batch_size=32)
    return float(np.mean([is_ring(im) for im in images]))


def measure(folder: Path, lora: Path | None = None) -> dict:
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    scores, _ = evaluate(pipe, "shapes", num_samples=200, seed=0)
    return {
        "subject_rate": ring_rate(pipe, INSTANCE),
        "class_ring_rate": ring_rate(pipe, CLASS),
        "all_correct": scores["all_correct"],
        "shape_accuracy": scores["shape_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/quickstart/pipeline"))
    parser.add_argument("--output", type=Path, default=Path("runs/bench-dreambooth"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.0)
    parser.add_argument(
        "--class-prompts",
        choices=["one", "grammar"],
        default="one",
        help="prior preservation on the class prompt alone (the paper's), or on every prompt of the "
        "built-in grammar, the class prompt first (54: what the model should keep)",
    )
    parser.add_argument("--num-class-images", type=int, default=100)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument(
        "--prior-target",
        choices=["noise", "model"],
        default="noise",
        help="unet.dreambooth.prior_target: the class images' noise (the paper's) or the untuned UNet's prediction",
    )
    parser.add_argument("--skip-no-prior", action="store_true", help="train only with prior preservation")
    parser.add_argument("--lora-rank", type=int, default=None, help="train a LoRA of this rank, not all weights")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = subject_folder(args.output / "subject")
    assert all(is_ring(Image.open(p)) for p in source.glob("*.png")), "the detector must read the subject"
    results: dict = {
        "model": str(args.model),
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "caption_dropout": args.caption_dropout,
        "class_prompts": args.class_prompts,
        "num_class_images": args.num_class_images,
        "lora_rank": args.lora_rank,
        "prior_loss_weight": args.prior_loss_weight,
        "prior_target": args.prior_target,
    }
    results["base"] = measure(args.model)
    print("base", results["base"])
    prior = CLASS if args.class_prompts == "one" else [CLASS] + [p for p in grammar_prompts() if p != CLASS]
    variants = [("prior_preservation", prior)] + ([] if args.skip_no_prior else [("no_prior", None)])
    for name, class_prompt in variants:
        dreambooth = {
            "instance_prompt": INSTANCE,
            "class_prompt": class_prompt,
            "num_class_images": args.num_class_images,
            "prior_loss_weight": args.prior_loss_weight,
            **({"prior_target": args.prior_target} if class_prompt is not None else {}),
        }
        cfg = config_from_dict(
            {
                "pretrained": str(args.model),
                "stages": ["unet"],
                "report_to": "none",
                "data": {"source": str(source), "cache_dir": str(args.output / "cache")},
                "unet": {
                    "steps": args.steps,
                    "batch_size": 4,
                    "learning_rate": args.learning_rate,
                    "warmup_steps": 0,
                    "caption_dropout": args.caption_dropout,
                    "checkpoint_every": None,
                    "dreambooth": dreambooth,
                    "lora": {"rank": args.lora_rank} if args.lora_rank else None,
                },
            }
        )
        start = time.monotonic()
        report = train(cfg, args.output / name)["unet"]
        results[name] = {
            "train_minutes": round((time.monotonic() - start) / 60, 2),
            "class_images": report.get("class_images"),
            "final_prior_loss": report.get("final_prior_loss"),
            **(measure(args.model, report["lora"]) if args.lora_rank else measure(args.output / name / "pipeline")),
        }
        print(name, results[name])
    text = json.dumps(results, indent=2)
    (args.output / "dreambooth_subject.json").write_text(text)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
