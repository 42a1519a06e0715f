"""What tag shuffling costs: encoding a batch's varied captions in the loop, beside a UNet step.

With ``unet.shuffle_tags`` or ``unet.tag_dropout`` the varied captions miss the embedding cache and
are encoded by the frozen text encoder in the step (training/captions.py). This times, in one
process, alternating, median of ``--repeats``:

- the quick start's UNet training step (forward, backward, AdamW; batch 64, fp32), the baseline;
- the quick start's text encoder on 64 new tag captions (no gradient): the added cost per step;
- a Stable Diffusion 1.x-sized text encoder (the ``sd15`` preset: CLIP ViT-L/14's text tower,
  123M parameters, 77 tokens, random weights) on 4 captions, a DreamBooth-sized batch.

Usage::

    python benchmarks/caption_encoding.py --out benchmarks/results/caption-encoding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from ldm_pipeline.training.attention import use_cpu_attention

from ldm_pipeline.presets import build_text_encoder, build_unet, get_preset
from ldm_pipeline.tokenizer import load_clip_tokenizer, token_ids

TAGS = ["sks", "red", "round", "small", "shiny", "on grass", "sunny", "close-up", "outdoors", "soft light"]


def _captions(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [", ".join(TAGS[i] for i in torch.randperm(len(TAGS), generator=generator).tolist()) for _ in range(count)]


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = get_preset("shapes")
    unet = build_unet(shapes)
    use_cpu_attention(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    latents = torch.randn(64, unet.config.in_channels, 8, 8)
    text = torch.randn(64, shapes.text.max_length, shapes.text.hidden_size)
    t = torch.randint(0, 1000, (64,))

    def unet_step() -> None:
        loss = (unet(latents, t, encoder_hidden_states=text).sample - latents).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    encoders = {}
    for name, count in (("shapes", 64), ("sd15", 4)):
        preset = get_preset(name)
        encoder = build_text_encoder(preset).eval()
        tokenizer = load_clip_tokenizer(preset.text.max_length)
        encoders[name] = (encoder, tokenizer, count)

    def encode(name: str, seed: list[int]) -> None:
        encoder, tokenizer, count = encoders[name]
        seed[0] += 1
        with torch.no_grad():
            encoder(token_ids(tokenizer, _captions(count, seed[0])))

    for fn in (unet_step, lambda: encode("shapes", [0]), lambda: encode("sd15", [0])):
        fn()  # warm-up
    counters = {"shapes": [100], "sd15": [200]}
    results = {"unet_step_s": [], "shapes_encode_64_s": [], "sd15_encode_4_s": []}
    for _ in range(args.repeats):
        results["unet_step_s"].append(_timed(unet_step, 1))
        results["shapes_encode_64_s"].append(_timed(lambda: encode("shapes", counters["shapes"]), 1))
        results["sd15_encode_4_s"].append(_timed(lambda: encode("sd15", counters["sd15"]), 1))
    median = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        **{k: round(v, 4) for k, v in median.items()},
        "shapes_added_per_step": round(median["shapes_encode_64_s"] / median["unet_step_s"], 3),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
