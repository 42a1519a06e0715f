"""Denoising objectives: what the UNet predicts, how its input is noised, how each loss is weighted.

Each function is one published idea; tests/test_objectives.py checks each against a hand
computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unknown(kind: str) -> ValueError:
    return ValueError(f"unknown prediction type {kind!r}; use one of {PREDICTION_TYPES}")


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, kind: str
) -> torch.Tensor:
    """The regression target for a prediction type.

    ``epsilon``: the added noise (Ho et al. 2020, DDPM, eq. 14). ``v_prediction``:
    v = α_t ε − σ_t x_0 (Salimans & Ho 2022, progressive distillation, section 4). ``sample``:
    x_0 itself (DDPM's "predict x_0" variant, Ho et al. 2020, section 3.2).
    """
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise _unknown(kind)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The weight on the x_0 loss is min(SNR, γ); expressed for the network's own target it is
    min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1) for v-prediction and
    min(SNR, γ) for x_0 (sample) prediction.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "sample":
        return clipped
    raise _unknown(kind)


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): ε + s·δ, δ ~ N(0, 1) per channel.

    A shared shift per image and channel lets the model learn to change an image's mean
    brightness and colour, which i.i.d. noise at the schedule's last step barely touches.
    """
    if strength == 0:
        return noise
    shift = torch.randn(noise.shape[:2], generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * shift[..., None, None]


def immiscible_noise(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Immiscible diffusion (Li et al. 2024, arXiv 2406.12303, algorithm 1): the batch's noise
    samples reassigned to its latents by the matching of least total L2 distance (scipy's
    ``linear_sum_assignment``), so that each latent is noised towards a nearby noise sample. The
    samples stay the same set of Gaussian draws; only their pairing with the latents changes."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(z0.detach().flatten(1).double().cpu(), noise.flatten(1).double().cpu())
    _, cols = linear_sum_assignment(cost.numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


def nearest_noise(z0: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The k-nearest variant of immiscible diffusion (Li et al. 2025, arXiv 2505.18521): of ``k``
    noise draws per latent (``candidates``: k × batch × ...), the one nearest to it in L2. Each
    latent's choice depends on its own draws only, so it is the same at any batch split."""
    distances = (candidates - z0.unsqueeze(0)).flatten(2).square().sum(-1)  # k × batch
    pick = distances.argmin(0)
    return candidates[pick, torch.arange(candidates.shape[1], device=candidates.device)]


def perturbed_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models", eq. 9): the UNet's input is noised with ε + γ·ξ, ξ ~ N(0, I), while the target stays ε,
    so training sees inputs as slightly off as sampling produces."""
    if gamma == 0:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def zero_terminal_snr_config() -> dict:
    """Scheduler settings for a zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", sections 3.1-3.3).

    Rescales the betas so that √ᾱ_T = 0 (the last step is pure noise, as at sampling's start)
    and samples from the last timestep ("trailing" spacing). With it the model must predict v
    (ε is unlearnable at SNR 0); the paper also rescales guidance (``guidance_rescale=0.7``).
    Given to both the training and the saved sampling scheduler.
    """
    return {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def sample_timesteps(
    n: int,
    low: int,
    high: int,
    generator: torch.Generator | None = None,
    density: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training timesteps in ``[low, high)``: a range narrower than the schedule's trains a
    specialist (e.g. only the high-noise steps that decide composition).

    ``density="uniform"``: DDPM's uniform draw. ``"logit_normal"``: the position in the range is
    sigmoid(u), u ~ N(logit_mean, logit_std) (Esser et al. 2024, "Scaling Rectified Flow
    Transformers", section 3.1; diffusers' ``compute_density_for_timestep_sampling``), which puts
    more of the steps in the middle of the schedule and fewer at its ends.
    """
    if density == "uniform":
        return torch.randint(low, high, (n,), generator=generator)
    if density != "logit_normal":
        raise ValueError(f"unknown timestep density {density!r}; use 'uniform' or 'logit_normal'")
    u = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=logit_mean, logit_std=logit_std, generator=generator
    )
    return (low + u * (high - low)).long().clamp(low, high - 1)


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "mse",
    huber_delta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss, averaged over all but the batch dimension.

    ``mse``: the squared error of DDPM. ``huber``: Huber's loss (Huber 1964), quadratic within
    ``huber_delta`` and linear beyond, so rare large errors pull less on the weights.
    ``weights`` (broadcast to the error, e.g. a loss mask ``[N, 1, h, w]`` in [0, 1]) scale each
    element before the average, which stays over all elements (as kohya-ss' masked loss): a
    mostly masked image pulls less.
    """
    if kind == "mse":
        err = F.mse_loss(pred, target, reduction="none")
    elif kind == "huber":
        err = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"unknown loss {kind!r}; use 'mse' or 'huber'")
    if weights is not None:
        err = err * weights
    return err.flatten(1).mean(1)
