"""Quality of the quick start: shapes adherence of its pipeline, and adherence against minutes.

Runs ``ldm quickstart`` (unless ``--run`` names a finished run folder), saving an EMA snapshot
of the UNet every ``--snapshot-minutes`` of training, then scores with the geometric analyser:

- the final pipeline at its default steps and guidance on ``--num-samples`` prompts (the bar);
- each snapshot on ``--curve-samples`` prompts (adherence against UNet training minutes);
- real dataset images through the same analyser (the baseline: what a perfect model scores),
  and their VAE reconstructions (the ceiling the VAE leaves the UNet).

Usage::

    python benchmarks/quickstart_quality.py --output runs/bench-quality
    python benchmarks/quickstart_quality.py --run runs/quickstart --num-samples 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusers import UNet2DConditionModel

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.data import make_shapes
from ldm_pipeline.evaluation import evaluate, to_tensor
from ldm_pipeline.evaluation.metrics import vae_reconstruct
from ldm_pipeline.evaluation.shapes import adherence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--run", type=Path, default=None, help="score this finished run instead of training")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--curve-samples", type=int, default=200)
    parser.add_argument("--snapshot-minutes", type=int, default=3)
    parser.add_argument("--guidance", type=float, nargs="*", default=[], help="also score at these guidance scales")
    parser.add_argument("overrides", nargs="*", help="quick-start config overrides, key=value")
    args = parser.parse_args()

    run = args.run
    results: dict = {}
    if run is None:
        from ldm_pipeline.training.quickstart import quickstart

        run = args.output
        start = time.monotonic()
        quickstart(
            run, eval_samples=16, overrides=[f"unet.snapshot_every_minutes={args.snapshot_minutes}", *args.overrides]
        )
        results["quickstart_wall_minutes"] = round((time.monotonic() - start) / 60, 2)
    results["train_report"] = json.loads((run / "train_report.json").read_text())

    pipe = LatentDiffusionPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    real = make_shapes(args.num_samples, seed=12_345, resolution=pipe.default_size)
    labels = [{k: r[k] for k in ("shape", "color", "background")} for r in real.remove_columns("image")]
    results["real_images"] = adherence(list(real["image"]), labels)
    reconstructions = vae_reconstruct(pipe.vae, to_tensor(list(real["image"])))
    results["vae_reconstructions"] = adherence(pipe.image_processor.postprocess(reconstructions), labels)
    final, images = evaluate(pipe, "shapes", args.num_samples, seed=1, clip_dir=run / "clip")
    results["final"] = final
    for g in args.guidance:
        results[f"guidance_{g:g}"] = evaluate(pipe, "shapes", args.curve_samples, seed=1, guidance_scale=g)[0]

    curve = []
    for snap in sorted((run / "snapshots").glob("unet-*min")):
        pipe.unet = UNet2DConditionModel.from_pretrained(snap)
        metrics, _ = evaluate(pipe, "shapes", args.curve_samples, seed=1)
        curve.append(
            {
                "unet_minutes": int(snap.name[5:8]),
                "all_correct": metrics["all_correct"],
                "shape_accuracy": metrics["shape_accuracy"],
                "color_accuracy": metrics["color_accuracy"],
            }
        )
        print(curve[-1], flush=True)
    results["curve"] = curve
    results["ratio_to_real"] = final["all_correct"] / results["real_images"]["all_correct"]
    (run / "quality.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "train_report"}, indent=2))
    print(
        f"all-correct adherence {final['all_correct']:.3f} on {args.num_samples} prompts "
        f"(real images: {results['real_images']['all_correct']:.3f}); wrote {run / 'quality.json'}"
    )


if __name__ == "__main__":
    main()
