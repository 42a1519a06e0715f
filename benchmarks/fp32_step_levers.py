"""fp32 training steps of the quick start's VAE and UNet on the CPU: profile and levers, beside eager.

For CPUs without bf16 units (AVX2 only), where the quick start trains in fp32. On a faster CPU,
emulate one by capping oneDNN and PyTorch's kernels at AVX2 and using one core::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 taskset -c 0 \\
        python benchmarks/fp32_step_levers.py --threads 1 --profile --out benchmarks/results/fp32-step-levers.json

Each lever is one training step (forward, backward, fused AdamW) of the model as the trainer
builds it, on random data at the quick start's batch sizes, timed beside the eager default in
the same process, alternating, ``--repeats`` times (median). Levers: channels-last layout,
PyTorch's native convolutions instead of oneDNN's, ``torch.compile`` (its compile time
reported apart). Allocators (jemalloc, tcmalloc) must be preloaded before Python starts: run the
script again under ``LD_PRELOAD=...`` and compare the eager lines. ``--profile`` prints the
torch.profiler table of the eager steps (top operators by self CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from ldm_pipeline.training.attention import use_cpu_attention
from ldm_pipeline.training.hardware import describe_machine
from ldm_pipeline.training.vae import Autoencode
from torch.profiler import ProfilerActivity, profile

from ldm_pipeline.presets import build_unet, build_vae, get_preset


def make_step(model: str, lever: str):
    """One fp32 training step of ``model`` ("vae" or "unet") with ``lever`` applied."""
    torch.backends.mkldnn.enabled = lever != "native_conv"
    preset = get_preset("shapes")
    generator = torch.Generator().manual_seed(0)
    if model == "vae":
        net = build_vae(preset)
        module = Autoencode(net)
        inputs = (torch.rand((32, 3, 32, 32), generator=generator) * 2 - 1,)

        def loss(forward):
            return (forward(*inputs)[0] - inputs[0]).pow(2).mean()
    else:
        net = build_unet(preset)
        use_cpu_attention(net)
        module = net
        latents = torch.randn((64, 8, 8, 8), generator=generator)
        text = torch.randn((64, preset.text.max_length, preset.text.hidden_size), generator=generator)
        t = torch.randint(0, 1000, (64,), generator=generator)
        inputs = (latents, t, text)

        def loss(forward):
            return (forward(*inputs).sample - latents).pow(2).mean()

    if lever == "channels_last":
        net.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
    forward = torch.compile(module) if lever == "compile" else module
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        loss(forward).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--levers", nargs="*", default=["channels_last", "native_conv", "compile"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "machine": describe_machine("no"),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "models": {},
    }
    for model in ("vae", "unet"):
        entry: dict = {}
        steps = {}
        for lever in ["eager", *args.levers]:
            start = time.perf_counter()
            steps[lever] = make_step(model, lever)
            for _ in range(2):  # warm-up; compile happens here
                steps[lever]()
            entry[lever] = {"first_two_steps_seconds": round(time.perf_counter() - start, 2), "ms": []}
        for _ in range(args.repeats):
            for lever, step in steps.items():
                torch.backends.mkldnn.enabled = lever != "native_conv"
                entry[lever]["ms"].append(time_step(step, args.steps) * 1000)
        torch.backends.mkldnn.enabled = True
        eager = statistics.median(entry["eager"]["ms"])
        for lever, values in entry.items():
            values["median_ms"] = round(statistics.median(values["ms"]), 1)
            values["speedup_vs_eager"] = round(eager / values["median_ms"], 3)
            print(f"{model} {lever}: {values['median_ms']} ms/step, {values['speedup_vs_eager']}x eager", flush=True)
        if args.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_step(steps["eager"], 3)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(table)
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            entry["profile_self_cpu_share"] = {
                e.key: round(e.self_cpu_time_total / total, 3)
                for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            }
        results["models"][model] = entry
    print(
        json.dumps(
            {
                m: {k: v.get("speedup_vs_eager") for k, v in e.items() if isinstance(v, dict) and "ms" in v}
                for m, e in results["models"].items()
            }
        )
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
