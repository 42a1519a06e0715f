"""Time to quality: shapes adherence against UNet training minutes, with and without trainer features.

Every variant trains the UNet stage alone for ``--minutes`` on the VAE and text encoder of one
finished quick-start run (``--base``; they load through ``vae.pretrained`` / ``clip.pretrained``,
and the variants share one latent cache), saving an EMA snapshot every ``--snapshot-minutes``.
Each snapshot and the final pipeline are scored on ``--num-samples`` prompts at the pipeline's
default steps and guidance. Variants run one after another, so they see the same machine.

Usage::

    python benchmarks/time_to_quality.py --base runs/quickstart --minutes 8 \
        --out benchmarks/results/time-to-quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate.state import AcceleratorState
from diffusers import UNet2DConditionModel
from ldm_pipeline.training.config import config_from_dict
from ldm_pipeline.training.run import train

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.evaluation import evaluate

# name -> overrides of the quick-start recipe (the defaults).
VARIANTS = {
    "defaults": [],
    "fp32": ["mixed_precision=no"],
    "sdpa_attention": ["unet.attention=sdpa"],
    "no_min_snr": ["unet.min_snr_gamma=null"],
    "v_prediction": ["unet.prediction_type=v_prediction"],
    "batch32": ["unet.batch_size=32"],
    "noise_offset": ["unet.noise_offset=0.05"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a finished quick-start run folder")
    parser.add_argument("--output", type=Path, default=Path("runs/time-to-quality"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--minutes", type=float, default=8)
    parser.add_argument("--snapshot-minutes", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results = {}
    for name in args.variants:
        out = args.output / name
        cfg = config_from_dict(
            {"stages": ["unet"], "data": {"cache_dir": str(args.output / "cache")}},
            [
                f"vae.pretrained={args.base}",
                f"clip.pretrained={args.base}",
                "unet.steps=null",
                f"unet.max_minutes={args.minutes}",
                f"unet.snapshot_every_minutes={args.snapshot_minutes}",
                *VARIANTS[name],
            ],
        )
        # Accelerate keeps one process-wide state; variants differ in mixed precision.
        AcceleratorState._reset_state(reset_partial_state=True)
        report = train(cfg, out)
        pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        final, _ = evaluate(pipe, "shapes", args.num_samples, seed=1)
        curve = []
        for snap in sorted((out / "snapshots").glob("unet-*min")):
            pipe.unet = UNet2DConditionModel.from_pretrained(snap)  # the rest of the pipeline is shared
            metrics, _ = evaluate(pipe, "shapes", args.num_samples, seed=1)
            curve.append({"unet_minutes": int(snap.name[5:8]), "all_correct": metrics["all_correct"]})
        curve.append({"unet_minutes": args.minutes, "all_correct": final["all_correct"]})
        results[name] = {"overrides": VARIANTS[name], "unet": report["unet"], "curve": curve}
        print(
            name, report["unet"]["steps"], "steps;", [(c["unet_minutes"], c["all_correct"]) for c in curve], flush=True
        )
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
