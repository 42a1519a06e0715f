"""Peak memory (RSS) of generating a batch, with and without VAE slicing and tiling.

Each case runs in its own Python process (peak RSS is per process): load the pipeline, generate
``--batch`` images at ``--size`` pixels, report the process's peak resident memory and the
seconds the call took. ``--size`` above the model's native size shows what VAE tiling is for.

Usage::

    python benchmarks/sampling_memory.py --model runs/quickstart/pipeline --batch 8 --size 256 \
        --out benchmarks/results/sampling-memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# AutoencoderKL's switches: decode the batch one image at a time; decode in overlapping tiles.
CASES = {
    "plain": [],
    "vae_slicing": ["enable_slicing"],
    "vae_slicing_tiling": ["enable_slicing", "enable_tiling"],
}


def _one(model: str, batch: int, size: int, steps: int, switches: list[str]) -> dict:
    import torch

    from ldm_pipeline.loading import load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    for switch in switches:
        getattr(pipe.vae, switch)()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    pipe(
        ["a red circle on a white background"] * batch,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mib": round(peak, 1), "after_load_mib": round(loaded, 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--case", choices=list(CASES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.case:  # the child process
        print(json.dumps(_one(args.model, args.batch, args.size, args.steps, CASES[args.case])))
        return
    if args.size is None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        vae = AutoencoderKL.load_config(args.model, subfolder="vae")
        unet = UNet2DConditionModel.load_config(args.model, subfolder="unet")
        args.size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    results = {"model": args.model, "batch": args.batch, "size": args.size, "steps": args.steps, "cases": {}}
    for case in CASES:
        command = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--case",
            case,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results["cases"][case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(case, results["cases"][case], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
