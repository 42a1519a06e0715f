"""Denoising objectives: what the UNet predicts, and how each timestep's loss is weighted."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, kind: str
) -> torch.Tensor:
    """The regression target for a prediction type.

    ``epsilon``: the added noise (Ho et al. 2020, DDPM, eq. 14). ``v_prediction``:
    v = α_t ε − σ_t x_0 (Salimans & Ho 2022, progressive distillation, section 4).
    """
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {kind!r}; use 'epsilon' or 'v_prediction'")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The weight on the x_0 loss is min(SNR, γ); expressed for the network's own target it is
    min(SNR, γ) / SNR for ε-prediction and min(SNR, γ) / (SNR + 1) for v-prediction.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction type {kind!r}; use 'epsilon' or 'v_prediction'")
