"""Pixels, latents and text embeddings computed once per run and kept in memory.

The UNet stage never runs the VAE encoder or the text encoder in its loop: both are frozen,
so their outputs are computed here once. Latents are cached raw (posterior mean and std) and
normalised by the VAE's ``scaling_factor`` at use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.data import load_builtin
from ldm_pipeline.tokenizer import token_ids

from .config import DataConfig


@dataclass
class Pixels:
    """Images as uint8 ``[N, 3, H, W]`` with their captions."""

    images: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def float_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index`` as float in [-1, 1]."""
        return self.images[index].float() / 127.5 - 1.0


def load_pixels(cfg: DataConfig) -> tuple[Pixels, Pixels]:
    """The configured dataset decoded once, split into training and held-out parts."""
    ds = load_builtin(cfg.name, num_samples=cfg.num_samples, seed=cfg.seed, resolution=cfg.resolution)
    if cfg.holdout >= len(ds):
        raise ValueError(f"data.holdout ({cfg.holdout}) must be smaller than the dataset ({len(ds)} images)")
    arrays = np.stack([np.asarray(im.convert("RGB").resize((cfg.resolution,) * 2)) for im in ds["image"]])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    texts = list(ds["text"])
    cut = len(ds) - cfg.holdout
    return Pixels(images[:cut], texts[:cut]), Pixels(images[cut:], texts[cut:])


@torch.no_grad()
def encode_latents(vae, pixels: Pixels, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for every image, in float32 on the CPU."""
    vae.eval()
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc="cache latents", leave=False):
        index = torch.arange(start, min(start + batch_size, len(pixels)))
        dist = vae.encode(pixels.float_batch(index).to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_texts(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of each distinct caption and, per text, the index of its embedding.

    The empty caption (used for caption dropout and as the unconditional prompt) is always
    entry 0.
    """
    unique = [""] + sorted(set(texts) - {""})
    position = {t: i for i, t in enumerate(unique)}
    text_encoder.eval()
    chunks = []
    for start in range(0, len(unique), batch_size):
        ids = token_ids(tokenizer, unique[start : start + batch_size])
        chunks.append(text_encoder(ids.to(text_encoder.device))[0].float().cpu())
    return torch.cat(chunks), torch.tensor([position[t] for t in texts])
