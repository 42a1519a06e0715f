"""Image metrics shared by training reports and ``ldm eval``."""

from __future__ import annotations

import torch

from ..tokenizer import token_ids


def psnr(images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean peak signal-to-noise ratio in dB of images in [0, 1] against references."""
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def vae_reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The VAE's reconstructions (posterior mean, decoded, clamped to [-1, 1]) of images in [-1, 1]."""
    vae.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(vae.device, vae.dtype)
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def vae_reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """PSNR of the VAE's reconstructions of images in [-1, 1]."""
    return psnr((vae_reconstruct(vae, images, batch_size) + 1) / 2, (images.float() + 1) / 2)


# OpenAI CLIP's image normalisation (per-channel mean and std of its training images).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], ``[N, 3, H, W]``, to CLIP's normalised pixel values."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


@torch.no_grad()
def clip_score(clip, tokenizer, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
    """Mean CLIP score 100 × max(cos(image, text), 0) (Hessel et al. 2021, CLIPScore).

    Args:
        clip: a ``transformers.CLIPModel`` (the run's evaluator).
        tokenizer: its tokenizer.
        images: ``[N, 3, H, W]`` in [-1, 1] at the CLIP model's image size.
        prompts: one prompt per image.
    """
    clip.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        ids = token_ids(tokenizer, prompts[start : start + batch_size])
        img = clip.get_image_features(pixel_values=clip_pixel_values(images[start : start + batch_size]))
        txt = clip.get_text_features(input_ids=ids)
        img, txt = (getattr(f, "pooler_output", f) for f in (img, txt))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        scores.append((100 * cos).clamp_min(0))
    return float(torch.cat(scores).mean())
