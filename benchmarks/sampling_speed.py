"""Sampling speed of LatentDiffusionPipeline against stock StableDiffusionPipeline on the same folder.

Both pipelines load the same saved folder (the same weights and scheduler). Each case times
``--repeats`` calls per batch size after two warm-up calls, alternating the two pipelines so that
they share the machine's noise, and reports the median images per second and the ratio. Ours runs
its first call with a new shape eagerly and traces the UNet in the second (``enable_unet_tracing``);
the seconds of both warm-up calls are reported as ``ours_warmup_seconds``. Cases:

- ``defaults``: what one line of code gives each (ours: 20 steps, guidance 2.5; stock: 50 steps,
  guidance 7.5), with the shapes adherence each reaches at those defaults (``--quality-samples``);
- ``fp32``: both in fp32 at ``--steps`` steps and guidance 2.5;
- ``bf16``: both loaded with ``torch_dtype=torch.bfloat16``, same steps and guidance;
- ``fp32_compiled`` and ``bf16_compiled`` (with ``--compile``, or named in ``--cases``): as ``fp32`` and ``bf16``, ours
  with ``pipe.unet.compile()`` (the warm-up call pays the compilation, which is timed and reported
  apart).

With ``--distilled FOLDER`` (a latent consistency model distilled from ``--model``: ``unet.distill``,
configs/lcm.yaml), the cases ``lcm_fp32`` and ``lcm_bf16`` time three pipelines alternating: the
distilled one at its sampling defaults (4 steps, the guidance in its embedding, no guidance
batch), ours on the teacher at its defaults (20 steps) and stock on the teacher at its defaults
(50 steps, guidance 7.5), with the adherence of each.

``--breakdown`` also times the parts of one of our fp32 calls at batch 1 (text encoder, UNet
loop, VAE decode), the ceiling of what caching prompt embeddings could save; wrapping the UNet's
forward to time it keeps that call eager.

Usage::

    python benchmarks/sampling_speed.py --model runs/quickstart/pipeline --out benchmarks/results/sampling-speed.json
    python benchmarks/sampling_speed.py --model runs/quickstart/pipeline --distilled runs/lcm/pipeline --cases \
        --out benchmarks/results/sampling-speed-lcm.json     # the distilled rows alone (`--cases` with no names)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.loading import load_pipeline
from ldm_pipeline.schedulers import sampling_defaults

PROMPT = "a red circle on a white background"
CASES = ("defaults", "fp32", "bf16", "fp32_compiled", "bf16_compiled")


def _load(model: Path, dtype: torch.dtype | None):
    ours = load_pipeline(model, torch_dtype=dtype)
    stock = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    stock.default_size = ours.default_size  # the evaluator asks the pipeline for its image size
    return ours, stock


def _time(pipes: dict, kwargs: dict, batch: int, repeats: int) -> tuple[dict[str, float], list[float]]:
    """Median images per second of each pipeline, calls alternating; and the seconds of ours' warm-up calls."""
    seconds: dict[str, list[float]] = {name: [] for name in pipes}
    warmup: list[float] = []
    for _ in range(2):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe([PROMPT] * batch, generator=torch.Generator().manual_seed(0), **kwargs[name])
            if name == "ours":
                warmup.append(round(time.perf_counter() - start, 3))
    for r in range(repeats):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe([PROMPT] * batch, generator=torch.Generator().manual_seed(r), **kwargs[name])
            seconds[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(values) for name, values in seconds.items()}, warmup


def _breakdown(model: Path, steps: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each part of one fp32 call at batch 1, timed by wrapping the calls the pipeline makes."""
    ours = load_pipeline(model)
    ours.set_progress_bar_config(disable=True)
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    # Instance attributes shadow the methods that the pipeline calls.
    ours.text_encoder.forward = timed("text_encoder", ours.text_encoder.forward)
    ours.unet.forward = timed("unet", ours.unet.forward)
    ours.vae.decode = timed("vae_decode", ours.vae.decode)
    runs: list[dict[str, float]] = []
    for r in range(repeats + 1):
        spent.clear()
        start = time.perf_counter()
        ours(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(r))
        spent["total"] = time.perf_counter() - start
        if r:  # the first call warms up
            runs.append(dict(spent))
    parts = {k: round(1000 * statistics.median(run[k] for run in runs), 1) for k in runs[0]}
    parts["other"] = round(parts["total"] - parts["text_encoder"] - parts["unet"] - parts["vae_decode"], 1)
    return parts


def _distilled_case(args: argparse.Namespace, case: str, dtype: torch.dtype | None) -> dict:
    """The distilled pipeline at its defaults against ours and stock on the teacher at theirs."""
    ours, stock = _load(args.model, dtype)
    lcm = load_pipeline(args.distilled, torch_dtype=dtype)
    lcm.set_progress_bar_config(disable=True)
    kwargs = {"lcm": sampling_defaults(lcm), "ours": {}, "stock": {}}
    pipes = {"lcm": lcm, "ours": ours, "stock": stock}
    entry: dict = {"call_kwargs": kwargs, "results": {}}
    for batch in args.batch_sizes:
        speed, _ = _time(pipes, kwargs, batch, args.repeats)
        row = {f"{name}_images_per_s": round(value, 2) for name, value in speed.items()}
        row["lcm_vs_stock_defaults"] = round(speed["lcm"] / speed["stock"], 2)
        row["lcm_vs_ours_defaults"] = round(speed["lcm"] / speed["ours"], 2)
        entry["results"][f"batch {batch}"] = row
        print(case, f"batch {batch}", row, flush=True)
    if args.quality_samples:
        for name, pipe in pipes.items():
            metrics, _ = evaluate(pipe, "shapes", args.quality_samples, seed=1, **kwargs[name])
            entry[f"{name}_all_correct"] = metrics["all_correct"]
        print(case, "adherence", {k: v for k, v in entry.items() if k.endswith("all_correct")}, flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality-samples", type=int, default=200, help="0 skips the adherence check")
    parser.add_argument("--compile", action="store_true", help="add the fp32 and bf16 cases with ours compiled")
    parser.add_argument(
        "--cases", nargs="*", choices=CASES, default=None, help="run only these cases (none: only --distilled's)"
    )
    parser.add_argument("--breakdown", action="store_true", help="time the parts of one fp32 call")
    parser.add_argument("--distilled", type=Path, default=None, help="an LCM pipeline distilled from --model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    results: dict = {"model": str(args.model), "steps": args.steps, "threads": torch.get_num_threads(), "cases": {}}
    same = {"num_inference_steps": args.steps, "guidance_scale": 2.5}
    cases = {
        "defaults": (None, {"ours": {}, "stock": {}}),
        "fp32": (None, {"ours": same, "stock": same}),
        "bf16": (torch.bfloat16, {"ours": same, "stock": same}),
        "fp32_compiled": (None, {"ours": same, "stock": same}),
        "bf16_compiled": (torch.bfloat16, {"ours": same, "stock": same}),
    }
    chosen = args.cases if args.cases is not None else [c for c in CASES if args.compile or not c.endswith("_compiled")]
    for case in chosen:
        dtype, kwargs = cases[case]
        ours, stock = _load(args.model, dtype)
        entry: dict = {"call_kwargs": kwargs}
        if case.endswith("_compiled"):
            ours.unet.compile()
            start = time.perf_counter()
            ours(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs["ours"])
            entry["compile_seconds"] = round(time.perf_counter() - start, 1)
        rows = {}
        for batch in args.batch_sizes:
            speed, warmup = _time({"ours": ours, "stock": stock}, kwargs, batch, args.repeats)
            rows[f"batch {batch}"] = {
                "ours_images_per_s": round(speed["ours"], 2),
                "stock_images_per_s": round(speed["stock"], 2),
                "speedup": round(speed["ours"] / speed["stock"], 3),
                "ours_warmup_seconds": warmup,
            }
            print(case, f"batch {batch}", rows[f"batch {batch}"], flush=True)
        entry["results"] = rows
        if args.quality_samples:
            for name, pipe in (("ours", ours), ("stock", stock)):
                metrics, _ = evaluate(pipe, "shapes", args.quality_samples, seed=1, **kwargs[name])
                entry[f"{name}_all_correct"] = metrics["all_correct"]
            print(case, "adherence", entry["ours_all_correct"], entry["stock_all_correct"], flush=True)
        results["cases"][case] = entry
    if args.distilled:
        for case, dtype in (("lcm_fp32", None), ("lcm_bf16", torch.bfloat16)):
            results["cases"][case] = _distilled_case(args, case, dtype)
    if args.breakdown:
        results["breakdown_batch_1"] = _breakdown(args.model, args.steps, args.repeats)
        print("breakdown", results["breakdown_batch_1"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
