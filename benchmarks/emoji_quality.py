"""Quality of a from-zero emoji run beside the real images' ceiling, and wall time.

Trains ``configs/emoji.yaml`` (unless ``--run`` names a finished run folder), then scores the
pipeline at its default steps and guidance with ``ldm eval --dataset emoji``'s measures, each
beside its ceiling on the real emoji: CLIP R-precision with the run's own CLIP evaluator (1 of
32 captions), the nearest real emoji in that CLIP's image space (top-1, top-5), and on the 66
held-out (emoji, skin tone) pairs the skin tone drawn and the emoji among the five nearest. Also
the VAE's PSNR on real emoji and a grid of named prompts (``emoji_grid.png``: generated above,
real below).

Usage::

    python benchmarks/emoji_quality.py --output runs/bench-emoji
    python benchmarks/emoji_quality.py --run runs/emoji      # score a finished run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _runs import trained_pipeline
from ldm_pipeline.training.hardware import describe_machine

from ldm_pipeline.data.emoji import make_emoji
from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.images import image_grid

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "emoji.yaml"
# Named prompts for the picture: trained emoji, and held-out tones (OK hand medium-dark, ...).
GRID = (
    "waving hand, medium skin tone",
    "grinning face",
    "red heart",
    "flag of Germany",
    "OK hand, medium-dark skin tone",
    "cat face",
    "pizza",
    "rocket",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-emoji"))
    parser.add_argument("--run", type=Path, default=None, help="score this finished run instead of training")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    results: dict = {"machine": describe_machine("auto")}
    run, pipe = trained_pipeline(CONFIG, args.output, args.run, args.overrides, results)
    results["final"], _ = evaluate(pipe, "emoji", args.num_samples, seed=1, clip_dir=run / "clip")

    everything = make_emoji(pipe.default_size, split="all")
    names = list(everything["name"])
    prompts = [f"an emoji of {name}" for name in GRID]
    made = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    real = [everything[names.index(name)]["image"] for name in GRID]
    image_grid([*made, *real], cols=len(GRID), scale=2).save(run / "emoji_grid.png")

    (run / "emoji_quality.json").write_text(json.dumps(results, indent=2))
    final = results["final"]
    print(json.dumps(results, indent=2))
    print(
        f"R-precision {final['r_precision']:.3f} (real {final['r_precision_real']:.3f}); nearest top-1 "
        f"{final['nearest_top1']:.3f}, top-5 {final['nearest_top5']:.3f}; held-out skin tone "
        f"{final['held_out_skin_tone']:.3f} (real {final['real_skin_tone']:.3f}), emoji top-5 "
        f"{final['held_out_emoji_top5']:.3f}; VAE PSNR {final['psnr']:.2f} dB; grid in {run / 'emoji_grid.png'}"
    )


if __name__ == "__main__":
    main()
