"""UNet training throughput of ``ldm train`` beside the way diffusers' example script trains.

The baseline follows ``examples/text_to_image/train_text_to_image.py`` of diffusers at its
defaults: every step decodes and augments the images (resize, centre crop, random flip,
normalise) and tokenises the captions, runs the frozen VAE encoder and text encoder, then the
UNet with an MSE loss on ε, AdamW (lr 1e-4, weight decay 1e-2), a constant LR schedule and
gradient clipping at 1.0; no mixed precision, no EMA. ``ldm train``'s UNet stage runs its own
loop on the same preset, data, batch and steps, with its defaults (cached latents and text
embeddings, bf16 autocast where the CPU runs bf16 natively, fused AdamW, EMA, min-SNR),
the VAE and text encoder given as ``pretrained`` parts; the one-off caching is timed apart.

Each method runs in its own process (so peak memory is its own), alternating, ``--repeats``
times; the report gives median samples per second, their ratio (and the median of each repeat's
ratio), peak resident memory and the UNet's achieved training FLOP/s as a share of this machine's
measured bf16 matmul peak.

Usage::

    python benchmarks/train_throughput.py --steps 40 --repeats 3 --out benchmarks/results/train-throughput.json
    python benchmarks/train_throughput.py --ldm-set unet.memory_format=channels_last   # ldm with an override
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _register_models() -> None:
    """``sd-parts``: Stable Diffusion 1.x's VAE and CLIP ViT-L/14 text encoder (random weights, as
    ``vae.pretrained`` / ``clip.pretrained`` would load them) under the quick start's small UNet,
    at 64x64: a UNet trained from zero on pretrained parts."""
    import dataclasses

    from ldm_pipeline.presets import PRESETS, get_preset

    small_unet = get_preset("shapes").unet
    PRESETS["sd-parts"] = dataclasses.replace(get_preset("sd15"), name="sd-parts", resolution=64, unet=small_unet)


def _images_and_captions(preset, num: int):
    from ldm_pipeline.data import load_builtin

    ds = load_builtin("shapes", num_samples=num, seed=0, resolution=preset.resolution)
    return list(ds["image"]), list(ds["text"])


def run_diffusers_way(preset_name: str, batch_size: int, steps: int) -> dict:
    """The example script's training step, on this project's preset (random weights)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from ldm_pipeline.presets import build_pipeline, get_preset

    preset = get_preset(preset_name)
    pipe = build_pipeline(preset)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images, captions = _images_and_captions(preset, batch_size * 8)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # the script's default: no mixed precision
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    rng = np.random.default_rng(0)
    size = preset.resolution

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The script's preprocess_train + collate_fn, with PIL and numpy for torchvision."""
        index = [(step * batch_size + i) % len(images) for i in range(batch_size)]
        pixels = []
        for i in index:
            im = images[i].convert("RGB").resize((size, size), resample=2)  # Resize, CenterCrop
            arr = np.asarray(im, dtype=np.float32) / 255.0
            if rng.random() < 0.5:  # RandomHorizontalFlip
                arr = arr[:, ::-1]
            pixels.append((arr - 0.5) / 0.5)  # ToTensor, Normalize([0.5], [0.5])
        pixel_values = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().float()
        ids = tokenizer(
            [captions[i] for i in index],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pixel_values, ids

    start = time.perf_counter()
    for step in range(steps):
        pixel_values, input_ids = batch(step)
        with accelerator.accumulate(unet):
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "mixed_precision": accelerator.mixed_precision}


def run_ldm(preset_name: str, batch_size: int, steps: int, overrides: list[str]) -> dict:
    """``ldm train``'s UNet stage on the preset's (untrained) VAE and text encoder given as
    ``pretrained`` parts, with ``overrides`` (``key=value``) on its defaults; ``seconds`` is its
    loop, ``cache_seconds`` its one-off encoding."""
    from ldm_pipeline.training.config import config_from_dict
    from ldm_pipeline.training.run import train

    from ldm_pipeline.presets import build_pipeline

    with tempfile.TemporaryDirectory() as out:
        build_pipeline(preset_name).save_pretrained(Path(out) / "parts")
        cfg = config_from_dict(
            {
                "model": preset_name,
                "stages": ["unet"],
                "report_to": "none",
                "data": {"name": "shapes", "num_samples": batch_size * 8 + 16, "holdout": 16},
                "vae": {"pretrained": str(Path(out) / "parts")},
                "clip": {"pretrained": str(Path(out) / "parts")},
                "unet": {"steps": steps, "batch_size": batch_size},
            },
            overrides,
        )
        report = train(cfg, Path(out) / "run")
    return {
        "seconds": report["unet"]["seconds"],
        "cache_seconds": report["unet"]["cache_seconds"],
        "steps": steps,
        "mixed_precision": report["mixed_precision"],
    }


def unet_training_flops(preset_name: str, batch_size: int) -> float:
    """FLOPs of one UNet forward + backward at this batch (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_pipeline.presets import build_unet, get_preset

    preset = get_preset(preset_name)
    unet = build_unet(preset)
    side = unet.config.sample_size
    x = torch.randn(batch_size, unet.config.in_channels, side, side)
    cond = torch.randn(batch_size, preset.text.max_length, preset.text.hidden_size)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(x, torch.randint(0, 1000, (batch_size,)), cond).sample.sum().backward()
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n×n×n matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes", help="a preset name, or sd-parts (see _register_models)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--ldm-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for ldm's run, e.g. unet.memory_format=channels_last (repeatable)",
    )
    parser.add_argument("--worker", choices=["ldm", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    _register_models()
    if args.worker:
        if args.worker == "ldm":
            result = run_ldm(args.preset, args.batch_size, args.steps, args.ldm_set)
        else:
            result = run_diffusers_way(args.preset, args.batch_size, args.steps)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    # This machine is shared: the peak is measured before and after the runs and the higher kept.
    peak_before = {dtype: matmul_peak(dtype) for dtype in (torch.bfloat16, torch.float32)}
    runs: dict[str, list[dict]] = {"ldm": [], "diffusers": []}
    for _ in range(args.repeats):
        for method in runs:
            cmd = [sys.executable, __file__, "--worker", method, "--preset", args.preset]
            cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            cmd += [f"--ldm-set={kv}" for kv in args.ldm_set]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-5:])
                sys.exit(f"train_throughput.py: the {method} run failed (exit {done.returncode}):\n{tail}")
            result = json.loads(done.stdout.split("RESULT ", 1)[1])
            result["samples_per_second"] = result["steps"] * args.batch_size / result["seconds"]
            runs[method].append(result)
            print(method, {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, flush=True)

    def median(method: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[method])

    flops_per_step = unet_training_flops(args.preset, args.batch_size)
    peak_bf16, peak_fp32 = (max(peak_before[d], matmul_peak(d)) for d in (torch.bfloat16, torch.float32))
    pair_ratios = [
        ours["samples_per_second"] / theirs["samples_per_second"]
        for ours, theirs in zip(runs["ldm"], runs["diffusers"], strict=True)
    ]
    report = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "ldm_overrides": args.ldm_set,
        "samples_per_second": {m: median(m, "samples_per_second") for m in runs},
        "speedup": median("ldm", "samples_per_second") / median("diffusers", "samples_per_second"),
        # Each repeat's two runs ran back to back: the median of their ratios is less moved by drift.
        "speedup_median_of_pairs": statistics.median(pair_ratios),
        "speedup_pairs": pair_ratios,
        # With the one-off latent and text caching counted in ldm's time (these steps, this data).
        "speedup_with_cache_time": median("diffusers", "seconds")
        / statistics.median(r["seconds"] + r["cache_seconds"] for r in runs["ldm"]),
        "peak_rss_mb": {m: median(m, "peak_rss_mb") for m in runs},
        "mixed_precision": {m: runs[m][0]["mixed_precision"] for m in runs},
        "unet_train_gflop_per_sample": flops_per_step / args.batch_size / 1e9,
        "matmul_peak_tflops": {"bf16": peak_bf16 / 1e12, "fp32": peak_fp32 / 1e12},
    }
    for m in runs:
        achieved = flops_per_step * median(m, "samples_per_second") / args.batch_size
        report[f"{m}_unet_tflops"] = achieved / 1e12
        report[f"{m}_share_of_bf16_peak"] = achieved / peak_bf16
    report["runs"] = runs
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
