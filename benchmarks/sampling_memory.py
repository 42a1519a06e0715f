"""Peak memory (RSS) of generating a batch, with and without VAE slicing and tiling, beside the estimate.

Each case runs in its own Python process (peak RSS is per process): load the pipeline (or build
a preset with random weights, ``--preset sd15``), sample one small image to warm up, then
generate ``--batch`` images at ``--size`` pixels, and report the process's peak resident memory,
what the call added to it, the seconds it took, and the sampling-memory estimate
(`ldm_pipeline.memory`): the largest activation and the ratio of the added memory to it, which
the refusal of requests too large for memory relies on (refused when ``LOW_FACTOR`` times the
largest activation is more than is free). ``--size`` above the model's native size shows what
VAE tiling is for.

Usage::

    python benchmarks/sampling_memory.py --model runs/quickstart/pipeline --batch 8 --size 256 \
        --out benchmarks/results/sampling-memory.json
    python benchmarks/sampling_memory.py --preset sd15 --batch 1 --size 512 --steps 1
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


def _one(model: str | None, preset: str | None, batch: int, size: int, steps: int, switches: list[str]) -> dict:
    import torch

    from ldm_pipeline import build_pipeline
    from ldm_pipeline.loading import load_pipeline
    from ldm_pipeline.memory import LOW_FACTOR, largest_activation

    torch.manual_seed(0)
    pipe = build_pipeline(preset) if preset else load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    for switch in switches:
        getattr(pipe.vae, switch)()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    small = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    pipe("warm up", height=small, width=small, num_inference_steps=1)
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    largest = largest_activation(
        pipe.unet.config,
        pipe.vae.config,
        size,
        size,
        batch,
        guided=True,
        vae_batch=1 if pipe.vae.use_slicing else batch,
        vae_tile=pipe.vae.tile_sample_min_size if pipe.vae.use_tiling else None,
    )
    largest_mib = largest * pipe.unet.dtype.itemsize / 2**20
    return {
        "peak_rss_mib": round(peak, 1),
        "after_load_mib": round(loaded, 1),
        "added_mib": round(peak - warm, 1),
        "largest_activation_mib": round(largest_mib, 1),
        "added_over_largest": round((peak - warm) / largest_mib, 2),
        "estimate_mib": round(LOW_FACTOR * largest_mib, 1),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="pipeline folder or Hub id")
    source.add_argument("--preset", help="a preset built with random weights (e.g. sd15), nothing loaded")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--case", choices=list(CASES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.case:  # the child process
        print(json.dumps(_one(args.model, args.preset, args.batch, args.size, args.steps, CASES[args.case])))
        return
    if args.size is None and args.preset:
        from ldm_pipeline.presets import get_preset

        args.size = get_preset(args.preset).resolution
    if args.size is None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        vae = AutoencoderKL.load_config(args.model, subfolder="vae")
        unet = UNet2DConditionModel.load_config(args.model, subfolder="unet")
        args.size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    from ldm_pipeline.training.hardware import describe_machine

    results = {
        "model": args.model or f"preset {args.preset}",
        "machine": describe_machine("no"),
        "batch": args.batch,
        "size": args.size,
        "steps": args.steps,
        "cases": {},
    }
    for case in CASES:
        command = [
            sys.executable,
            __file__,
            *(["--model", args.model] if args.model else ["--preset", args.preset]),
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
