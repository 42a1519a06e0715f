"""How well generated emoji follow their captions, with no pretrained model: only the run's own CLIP.

- **CLIP R-precision** (Park et al. 2021, "Benchmark for compositional text-to-image synthesis"):
  for each generated image, is its caption ranked first among ``candidates`` captions (its own
  and others of the set, drawn at random) by the run's CLIP evaluator? The same on the real
  images of those captions is the ceiling.
- **Nearest real image**: in the CLIP evaluator's image-feature space, is the prompt's own emoji
  the nearest real emoji to the generated one (top-1), or among the five nearest (top-5)?
- **Held-out composition**: prompts for the (emoji, skin tone) pairs left out of training
  (`ldm_pipeline.data.emoji.held_out_pairs`): is the asked skin tone the one drawn (OpenMoji paints
  each tone in one fixed colour: the tone of the real variant of that emoji whose tone-colour
  counts are nearest; the real image itself scores 1 by construction), and is the asked
  emoji, in any tone, among the five nearest real images?
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from ..data.emoji import SKIN_TONES, held_out_pairs, make_emoji, render
from ..tokenizer import token_ids
from .metrics import clip_pixel_values

TEMPLATE = "an emoji of {name}"
# A pixel is of a tone's colour within this distance per channel (anti-aliased edges are not).
TONE_TOLERANCE = 24


@torch.no_grad()
def clip_features(clip, tokenizer, images: torch.Tensor | None = None, texts: list[str] | None = None, batch=128):
    """Unit-length CLIP image features of ``[N, 3, H, W]`` images in [-1, 1], or text features."""
    clip.eval()
    out = []
    items = images if images is not None else texts
    for start in range(0, len(items), batch):
        if images is not None:
            f = clip.get_image_features(pixel_values=clip_pixel_values(images[start : start + batch]))
        else:
            f = clip.get_text_features(input_ids=token_ids(tokenizer, texts[start : start + batch]))
        f = getattr(f, "pooler_output", f)
        out.append(torch.nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(out)


def r_precision(
    image_features: torch.Tensor, caption_features: torch.Tensor, own: list[int], candidates: int, seed: int
) -> float:
    """Share of images whose own caption (row ``own[i]`` of ``caption_features``) scores highest
    among it and ``candidates - 1`` other captions drawn at random."""
    rng = random.Random(seed)
    hits = 0
    for i, mine in enumerate(own):
        others = rng.sample([j for j in range(len(caption_features)) if j != mine], candidates - 1)
        sims = caption_features[[mine, *others]] @ image_features[i]
        hits += int(sims.argmax()) == 0
    return hits / len(own)


def tone_colours() -> dict[str, np.ndarray]:
    """OpenMoji's colour for each skin tone: the most common non-white colour of its waving hand."""
    colours = {}
    for point, tone in SKIN_TONES.items():
        pixels = np.asarray(render(f"1F44B-{point:X}", 64)).reshape(-1, 3)
        values, counts = np.unique(pixels[(pixels < 250).any(1)], axis=0, return_counts=True)
        colours[tone] = values[counts.argmax()].astype(int)
    return colours


def tone_counts(image: Image.Image, colours: dict[str, np.ndarray]) -> np.ndarray:
    """Per skin tone, the share of the image's pixels in that tone's colour."""
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    return np.array([(np.abs(pixels - c).max(1) <= TONE_TOLERANCE).mean() for c in colours.values()])


def skin_tone(image: Image.Image, colours: dict[str, np.ndarray], variants: dict[str, Image.Image]) -> str | None:
    """The skin tone drawn in ``image``: that of the real variant (same emoji, each tone) whose
    tone-colour counts are nearest. Hair and clothes that share a tone's colour (OpenMoji's browns)
    are the same in every variant and cancel out. None: no pixel of any tone's colour."""
    counts = tone_counts(image, colours)
    if not counts.any():
        return None
    return min(variants, key=lambda tone: np.abs(tone_counts(variants[tone], colours) - counts).sum())


class EmojiJudge:
    """The run's CLIP evaluator with every real emoji's features, computed once, to score
    generated emoji: the full evaluation (`emoji_metrics`) and the UNet stage's monitor alike."""

    def __init__(self, clip, tokenizer, resolution: int):
        from . import to_tensor

        self.clip, self.tokenizer = clip, tokenizer
        self.clip_size = clip.config.vision_config.image_size
        # Every emoji once; the training and held-out rows are picked out of it.
        everything = make_emoji(resolution=resolution, split="all")
        self.names, self.bases = list(everything["name"]), list(everything["base"])
        self.tones = list(everything["skin_tone"])
        self.images = list(everything["image"])
        held_pairs = held_out_pairs()
        self.held_rows = [i for i, pair in enumerate(zip(self.bases, self.tones, strict=True)) if pair in held_pairs]
        self.train_rows = sorted(set(range(len(self.names))) - set(self.held_rows))
        self.caption_features = clip_features(clip, tokenizer, texts=[TEMPLATE.format(name=n) for n in self.names])
        self.real_features = clip_features(clip, tokenizer, images=to_tensor(self.images, self.clip_size))
        self.colours = tone_colours()
        self.variants: dict[str, dict[str, Image.Image]] = {self.bases[i]: {} for i in self.held_rows}
        for image, base, tone in zip(self.images, self.bases, self.tones, strict=True):
            if tone and base in self.variants:
                self.variants[base][tone] = image

    def sample_rows(self, num_samples: int, seed: int) -> list[int]:
        """``num_samples`` training emoji (rows), drawn with ``seed``."""
        rng = random.Random(seed)
        return [
            self.train_rows[i] for i in rng.sample(range(len(self.train_rows)), min(num_samples, len(self.train_rows)))
        ]

    def prompts(self, rows: list[int]) -> list[str]:
        return [TEMPLATE.format(name=self.names[i]) for i in rows]

    def _features(self, images: list[Image.Image]) -> torch.Tensor:
        from . import to_tensor

        return clip_features(self.clip, self.tokenizer, images=to_tensor(images, self.clip_size))

    def adherence(self, generated: list[Image.Image], own: list[int], candidates: int, seed: int) -> dict:
        """R-precision of images generated for rows ``own`` and their nearest real emoji."""
        features = self._features(generated)
        nearest = (features @ self.real_features.T).topk(5, dim=1).indices
        return {
            "r_precision": r_precision(features, self.caption_features, own, candidates, seed),
            "nearest_top1": float(np.mean([int(n[0]) == o for n, o in zip(nearest, own, strict=True)])),
            "nearest_top5": float(np.mean([o in n.tolist() for n, o in zip(nearest, own, strict=True)])),
        }

    def skin_tones(self, generated: list[Image.Image], rows: list[int]) -> list[str | None]:
        """The skin tone drawn in each image generated for a held-out row."""
        return [
            skin_tone(im, self.colours, self.variants[self.bases[i]]) for im, i in zip(generated, rows, strict=True)
        ]

    def held_out(self, generated: list[Image.Image], rows: list[int]) -> dict:
        """For images generated for held-out rows: the asked skin tone drawn, the emoji among the five nearest."""
        tones = self.skin_tones(generated, rows)
        near = (self._features(generated) @ self.real_features.T).topk(5, dim=1).indices
        return {
            "held_out_skin_tone": float(np.mean([t == self.tones[i] for t, i in zip(tones, rows, strict=True)])),
            "held_out_emoji_top5": float(
                np.mean([self.bases[i] in {self.bases[j] for j in n.tolist()} for n, i in zip(near, rows, strict=True)])
            ),
        }


def emoji_metrics(
    generate_images,
    clip,
    tokenizer,
    resolution: int,
    num_samples: int = 200,
    seed: int = 0,
    candidates: int = 32,
) -> dict:
    """The measures above for ``generate_images(prompts, seed) -> list[PIL image]``.

    Returns fractions in [0, 1]: ``r_precision`` and ``r_precision_real`` (the ceiling),
    ``nearest_top1``, ``nearest_top5``, ``held_out_skin_tone``, ``held_out_emoji_top5``, and the
    counts of prompts used.
    """
    judge = EmojiJudge(clip, tokenizer, resolution)
    own = judge.sample_rows(num_samples, seed)
    generated = generate_images(judge.prompts(own), seed)
    report = {
        "dataset": "emoji",
        "prompts": len(own),
        "candidates": candidates,
        **judge.adherence(generated, own, candidates, seed),
        "r_precision_real": r_precision(judge.real_features[own], judge.caption_features, own, candidates, seed),
    }
    held = judge.held_rows
    report |= {"held_out_prompts": len(held), **judge.held_out(generate_images(judge.prompts(held), seed + 1), held)}
    real_tones = judge.skin_tones([judge.images[i] for i in held], held)
    report["real_skin_tone"] = float(np.mean([t == judge.tones[i] for t, i in zip(real_tones, held, strict=True)]))
    return report
