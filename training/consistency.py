"""Latent consistency distillation: the maths of one step (Luo et al. 2023, "Latent Consistency
Models", arXiv 2310.04378, Algorithm 1; LCM-LoRA, arXiv 2311.05556).

A consistency model f(x_t, t) maps every point of a probability-flow ODE trajectory to the
trajectory's origin. It is parameterised from the UNet's x_0 estimate so that f(x, 0) = x holds
by construction (`boundary_scalings`, `consistency_output`). Distillation pulls f at t_{n+k} onto
the target network's f at t_n, where x_{t_n} comes from x_{t_{n+k}} by one DDIM step of the
guided teacher over the skipping step k (`SkippingSolver`): the teacher's ODE, integrated on
N of the T training timesteps. Sampling the result is diffusers' `LCMScheduler`, whose boundary
scalings these equal (tests/test_consistency.py checks both against diffusers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, LCMScheduler

from ldm_pipeline.schedulers import implied_noise

# LCMScheduler's: the data's standard deviation in the boundary scalings (Song et al. 2023,
# "Consistency Models", appendix C) and the factor on the timestep that makes c_skip vanish one
# step away from the boundary.
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t) and c_out(t) with c_skip(0) = 1 and c_out(0) = 0 (LCM, eq. 9), shaped to broadcast over latents."""
    scaled = t.double() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


def predicted_origin(
    output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str
) -> torch.Tensor:
    """The x_0 a UNet's output implies at (x_t, t) for its prediction type (DDIM, Song et al. 2021, eq. 9)."""
    alpha = alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
    if kind == "epsilon":
        return (x_t - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * output
    if kind == "sample":
        return output
    raise ValueError(f"unknown prediction type {kind!r}")


def predicted_noise(
    output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str
) -> torch.Tensor:
    """The ε a UNet's output implies at (x_t, t): the direction DDIM keeps along the trajectory."""
    alpha = alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return implied_noise(output, x_t, alpha, kind)


def consistency_output(
    output: torch.Tensor,
    t: torch.Tensor,
    x_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    kind: str,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0: what `LCMScheduler` denoises to (its step 6)."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    return c_skip * x_t + c_out * predicted_origin(output, t, x_t, alphas_cumprod, kind)


@dataclass(frozen=True)
class SkippingSolver:
    """DDIM (η = 0) on ``N`` evenly spaced training timesteps, the skipping step k = T / N apart
    (LCM section 4.2 and Algorithm 1's Ψ): index n's timestep is (n + 1) k - 1 and its step goes to
    n k - 1, the first one to timestep 0."""

    timesteps: torch.Tensor  # ascending, int64
    alphas_cumprod: torch.Tensor  # the training schedule's ᾱ, float64
    skip: int

    @classmethod
    def from_schedule(cls, scheduler: DDPMScheduler | LCMScheduler, num_steps: int = 50) -> SkippingSolver:
        total = scheduler.config.num_train_timesteps
        if not 1 <= num_steps <= total:
            raise ValueError(f"the teacher's steps must be in 1..{total}, got {num_steps}")
        skip = total // num_steps
        timesteps = torch.arange(1, num_steps + 1, dtype=torch.int64) * skip - 1
        return cls(timesteps, scheduler.alphas_cumprod.double(), skip)

    def previous(self, index: torch.Tensor) -> torch.Tensor:
        """The timestep a step from index ``index`` lands on (0 for the first)."""
        return (self.timesteps[index] - self.skip).clamp(min=0)

    def step(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x at the previous timestep: √ᾱ_prev x̂_0 + √(1 − ᾱ_prev) ε̂ (DDIM, η = 0)."""
        alpha = self.alphas_cumprod[self.previous(index)].view(-1, 1, 1, 1).to(x0.device, x0.dtype)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance with LCM's w (guidance scale w + 1): cond + w (cond − uncond) (LCM, eq. 7)."""
    return cond + w.view(-1, 1, 1, 1).to(cond) * (cond - uncond)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Per-sample distance: ``l2`` (mean squared) or pseudo-Huber √(d² + c²) − c (Song & Dhariwal
    2023, "Improved Techniques for Training Consistency Models", section 3.3)."""
    diff = (pred.float() - target.float()).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "huber":
        return ((diff.pow(2) + huber_c**2).sqrt() - huber_c).mean(1)
    raise ValueError(f"unknown consistency loss {kind!r}; use 'l2' or 'huber'")
