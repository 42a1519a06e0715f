"""PyTorch's attention kernel on the CPU in bf16 against fp32, and what it does to a UNet training step.

Part 1 times `F.scaled_dot_product_attention` forward + backward on bf16 inputs against the same
call on inputs cast to fp32 (the casts counted, as `CPUAttnProcessor` does them), over sequence
lengths from the quick-start UNet's (4 and 16 latent positions, 24 text tokens) to Stable
Diffusion's (4,096). Part 2 times the quick-start UNet's training step (forward, backward, fused
AdamW) under bf16 autocast with diffusers' `AttnProcessor2_0` against `CPUAttnProcessor`, and
in fp32. Calls alternate; each figure is a median.

Usage::

    python benchmarks/attention_kernels.py --out benchmarks/results/attention-kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# (batch, heads, query length, key length, head dim)
SHAPES = [
    (64, 8, 4, 4, 16),
    (64, 8, 16, 16, 16),
    (64, 8, 16, 24, 16),
    (64, 8, 64, 64, 16),
    (16, 8, 256, 256, 16),
    (16, 8, 256, 256, 40),
    (4, 8, 1024, 77, 40),
    (8, 8, 512, 512, 40),
    (4, 8, 1024, 1024, 40),
    (1, 8, 4096, 4096, 40),
]


def alternating_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls taking turns after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_call(shape: tuple[int, ...], upcast: bool) -> Callable[[], None]:
    batch, heads, length, keys, dim = shape
    q = torch.randn(batch, heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, heads, keys, dim, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, heads, keys, dim, dtype=torch.bfloat16, requires_grad=True)

    def call() -> None:
        if upcast:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out.sum().backward()

    return call


def unet_step(processor: str, autocast: bool, batch: int) -> Callable[[], None]:
    from diffusers.models.attention_processor import AttnProcessor2_0
    from ldm_pipeline.training.attention import CPUAttnProcessor

    from ldm_pipeline.presets import build_unet, get_preset

    preset = get_preset("shapes")
    torch.manual_seed(0)
    unet = build_unet(preset).train()
    unet.set_attn_processor(CPUAttnProcessor() if processor == "cpu" else AttnProcessor2_0())
    side = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, side, side)
    cond = torch.randn(batch, preset.text.max_length, preset.text.hidden_size)
    t = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)

    def call() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (unet(x, t, cond).sample.float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64, help="the UNet step's batch (the quick start's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    kernels = []
    for shape in SHAPES:
        calls = {"bf16": attention_call(shape, False), "fp32": attention_call(shape, True)}
        t = alternating_medians(calls, args.repeats)
        row = {"shape_bhlsd": shape, "bf16_ms": t["bf16"] * 1e3, "fp32_ms": t["fp32"] * 1e3}
        row["bf16_over_fp32"] = t["bf16"] / t["fp32"]
        kernels.append(row)
        print(f"{shape}: bf16 {row['bf16_ms']:.2f} ms, fp32 {row['fp32_ms']:.2f} ms, {row['bf16_over_fp32']:.2f}x")

    steps = alternating_medians(
        {
            "bf16_sdpa": unet_step("sdpa", True, args.batch_size),
            "bf16_cpu_attention": unet_step("cpu", True, args.batch_size),
            "fp32_sdpa": unet_step("sdpa", False, args.batch_size),
        },
        args.repeats,
    )
    unet = {f"{name}_samples_per_second": args.batch_size / s for name, s in steps.items()}
    unet["cpu_attention_speedup_bf16"] = steps["bf16_sdpa"] / steps["bf16_cpu_attention"]
    unet["bf16_cpu_attention_over_fp32"] = steps["fp32_sdpa"] / steps["bf16_cpu_attention"]
    print(json.dumps(unet, indent=2))
    if args.out:
        report = {"repeats": args.repeats, "batch_size": args.batch_size, "kernels": kernels, "unet_step": unet}
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
