"""The from-zero shapes recipe before and after: quality against optimiser steps, FLOPs and minutes.

Each recipe trains all three stages from zero in its own run folder, one after the other on the
same machine, with a step budget of its own instead of the quick start's minutes, so its curves
do not depend on the machine: the VAE's held-out PSNR every ``--vae-every`` steps and the EMA
UNet's adherence on the stratified quality prompts (``training/quality.py``; 108: each
combination twice) every ``--unet-every`` steps, measured by the trainer as it runs. The new
recipe also stops each stage at its quality target, as the quick start does. Each final pipeline is then scored on
``--num-samples`` prompts (seed 0, the quick start's evaluation). FLOPs per step come from torch's
FLOP counter on one training step of each model.

``previous``: the recipe of the first 32 px quick start (L1 VAE at 1e-3 with a cosine schedule,
latents scaled by one global factor; a 6.7M UNet of 64/128/128 channels at 1e-3, cosine, 200
warm-up steps, timesteps uniform), at the step counts its quick start ran on a 2-core AMD EPYC
with AVX-512 BF16 in 6 + 17 minutes. ``current``: the shipped defaults (``training/config.py``;
the L2 VAE with its decay and target, its latents standardised per channel) with the quick
start's recipe (``configs/shapes.yaml``: logit-normal timesteps, targets, the same 3,300-step
UNet cosine as a ceiling).

Usage::

    python benchmarks/recipe_curves.py --output runs/recipe-curves --out benchmarks/results/recipe-curves.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from accelerate.state import AcceleratorState
from ldm_pipeline.configs import shipped
from ldm_pipeline.training.config import RunConfig, config_from_dict
from ldm_pipeline.training.quickstart import RECIPE, synthetic_inputs
from ldm_pipeline.training.run import train
from ldm_pipeline.training.vae import Autoencode
from torch.utils.flop_counter import FlopCounterMode

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.presets import PRESETS, UNetPreset, build_unet, build_vae, get_preset
from ldm_pipeline.yaml_io import read_yaml

# The quick start's UNet before this release.
PREVIOUS_UNET = UNetPreset(channels=(64, 128, 128), attention=(False, True, True), layers_per_block=1)


def _register_previous() -> None:
    PRESETS["shapes-previous"] = dataclasses.replace(get_preset("shapes"), name="shapes-previous", unet=PREVIOUS_UNET)


def recipes(vae_every: int, unet_every: int) -> dict[str, list[str]]:
    """Config overrides of each recipe (on top of the shipped defaults)."""
    measure = [f"vae.eval_every={vae_every}", f"unet.eval_every={unet_every}", "unet.quality_prompts=108"]
    measure.append("report_to=none")
    previous = [
        "model=shapes-previous",
        "vae.loss=l1",
        "vae.learning_rate=0.001",
        "vae.lr_scheduler=cosine",
        "vae.steps=3000",
        "vae.standardise_latents=false",
        "unet.learning_rate=0.001",
        "unet.lr_scheduler=cosine",
        "unet.warmup_steps=200",
        "unet.steps=3300",
    ]
    recipe = read_yaml(shipped(RECIPE))
    stages = {k: v for k, v in recipe.items() if isinstance(v, dict) and k in ("vae", "clip", "unet")}
    current = [f"{stage}.{key}={value}" for stage, keys in stages.items() for key, value in keys.items()]
    # Step ceilings instead of the quick start's minutes (the targets stop the stages first).
    current = [o for o in current if ".max_minutes=" not in o and ".steps=" not in o]
    current += ["vae.steps=3000", "unet.steps=3300", "clip.steps=150"]
    return {"previous": previous + measure, "current": current + measure}


def _flops(step) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def training_flops(cfg: RunConfig) -> dict[str, float]:
    """FLOPs of one optimiser step (forward + backward) of the VAE and of the UNet at their batch sizes."""
    preset = get_preset(cfg.model)
    inputs = synthetic_inputs(cfg)
    autoencode = Autoencode(build_vae(preset))
    unet = build_unet(preset)
    return {
        "vae": _flops(lambda: autoencode(*inputs["vae"])[0].sum().backward()),
        "unet": _flops(lambda: unet(*inputs["unet"]).sample.sum().backward()),
    }


def first_step_reaching(curve: list[dict], bar: float) -> int | None:
    return next((point["step"] for point in curve if point["value"] >= bar), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/recipe-curves"))
    parser.add_argument("--recipes", nargs="*", default=["previous", "current"], choices=["previous", "current"])
    parser.add_argument("--vae-every", type=int, default=100)
    parser.add_argument("--unet-every", type=int, default=250)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    _register_previous()

    results: dict = {"machine": None}
    for name in args.recipes:
        cfg = config_from_dict({}, recipes(args.vae_every, args.unet_every)[name])
        AcceleratorState._reset_state(reset_partial_state=True)
        start = time.monotonic()
        report = train(cfg, args.output / name)
        minutes = (time.monotonic() - start) / 60
        pipe = LatentDiffusionPipeline.from_pretrained(args.output / name / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        final, _ = evaluate(pipe, "shapes", args.num_samples, seed=0)
        flops = training_flops(cfg)
        vae, unet = report["vae"], report["unet"]
        results[name] = {
            "overrides": recipes(args.vae_every, args.unet_every)[name],
            "train_minutes": round(minutes, 2),
            "mixed_precision": report["mixed_precision"],
            "vae": {k: vae.get(k) for k in ("steps", "minutes", "psnr", "quality_curve", "target_reached")},
            "unet": {k: unet.get(k) for k in ("steps", "minutes", "quality_curve", "target_reached")},
            "gflop_per_step": {k: round(v / 1e9, 2) for k, v in flops.items()},
            "steps_to": {
                "vae_30dB": first_step_reaching(vae["quality_curve"], 30.0),
                "unet_0.9": first_step_reaching(unet["quality_curve"], 0.9),
                "unet_0.95": first_step_reaching(unet["quality_curve"], 0.95),
            },
            "final": {k: final[k] for k in ("all_correct", "color_accuracy", "shape_accuracy", "background_accuracy")},
        }
        total = vae["steps"] * flops["vae"] + unet["steps"] * flops["unet"]
        results[name]["training_tflop"] = round(total / 1e12, 1)
        print(name, json.dumps({k: v for k, v in results[name].items() if k not in ("vae", "unet")}), flush=True)
    if "previous" in results and "current" in results:
        old, new = results["previous"], results["current"]
        results["ratios"] = {
            "steps (VAE + UNet)": (old["vae"]["steps"] + old["unet"]["steps"])
            / (new["vae"]["steps"] + new["unet"]["steps"]),
            "training FLOPs": old["training_tflop"] / new["training_tflop"],
            "train minutes": old["train_minutes"] / new["train_minutes"],
        }
        print("previous / current:", json.dumps(results["ratios"]))
    from ldm_pipeline.training.hardware import describe_machine

    results["machine"] = describe_machine("auto")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
