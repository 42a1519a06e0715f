"""Sampler names for the command line, each a diffusers scheduler built from a pipeline's config."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError


def implied_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, kind: str) -> torch.Tensor:
    """The ε a model's output implies at ``sample`` = √ᾱ x_0 + √(1 − ᾱ) ε, for its prediction type
    (``alpha``: ᾱ_t, broadcastable over ``sample``)."""
    if kind == "epsilon":
        return model_output
    if kind == "v_prediction":
        return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    if kind == "sample":
        return (sample - alpha.sqrt() * model_output) / (1 - alpha).sqrt()
    raise ValueError(f"unknown prediction_type {kind!r}")


class LangevinCorrectorScheduler(SchedulerMixin, ConfigMixin):
    """Predictor-corrector sampling of the reverse VP SDE (Song et al. 2021, "Score-Based
    Generative Modeling through Stochastic Differential Equations", Algorithms 2 and 5).

    Predictor: one ancestral (reverse-diffusion) step, DDPM's posterior sample from t to the
    next timestep. Corrector: ``corrector_steps`` Langevin MCMC steps at the new timestep,
    x ← x + ε s + √(2ε) z with the score s = -ε̂/σ_t and the step size set by the signal-to-noise
    ratio ``snr``: ε = 2 α_t (snr ‖z‖ / ‖s‖)², per sample. Each corrector step needs a fresh model
    evaluation at the same timestep, so ``timesteps`` repeats every timestep after the first
    ``corrector_steps`` more times (as Heun's scheduler does for its second evaluation), and the
    pipeline's loop runs it like any scheduler: 1 + corrector_steps UNet calls per step.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        rescale_betas_zero_snr: bool = False,
        corrector_steps: int = 1,
        snr: float = 0.1,
    ):
        if corrector_steps < 0 or snr <= 0:
            raise ValueError(f"corrector_steps must be >= 0 and snr > 0, got {corrector_steps} and {snr}")
        self.predictor = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            clip_sample=False,
        )
        self.alphas_cumprod = self.predictor.alphas_cumprod
        self.alphas = self.predictor.alphas
        self.init_noise_sigma = 1.0
        self.timesteps = self.predictor.timesteps
        self.num_inference_steps: int | None = None
        self._kinds: list[str] = []
        self._index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The predictor's timesteps, each after the first followed by its corrector evaluations."""
        self.predictor.set_timesteps(num_inference_steps, device=device)
        base = self.predictor.timesteps
        repeats = torch.full((len(base),), 1 + self.config.corrector_steps, dtype=torch.long)
        repeats[0] = 1
        self.timesteps = base.repeat_interleave(repeats.to(base.device))
        self._kinds = ["P"] + (["C"] * self.config.corrector_steps + ["P"]) * (len(base) - 1)
        self.num_inference_steps = num_inference_steps
        self._index = 0

    def _epsilon(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].to(sample.device, torch.float32)
        return implied_noise(model_output, sample, a, self.config.prediction_type)

    def langevin_step(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """One corrector step at timestep ``t`` with the given standard normal ``noise``."""
        x = sample.float()
        a = self.alphas_cumprod[t].to(x.device, torch.float32)
        score = -self._epsilon(model_output.float(), t, x) / (1 - a).sqrt()
        dims = tuple(range(1, x.ndim))
        ratio = noise.float().flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp_min(1e-12)
        step = (2 * self.alphas[t].to(x.device, torch.float32) * (self.config.snr * ratio) ** 2).view(
            -1, *[1] * len(dims)
        )
        return (x + step * score + (2 * step).sqrt() * noise.float()).to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """A predictor or a corrector step, as ``timesteps`` lays them out."""
        if not self._kinds:
            raise ValueError("call set_timesteps before step")
        kind = self._kinds[min(self._index, len(self._kinds) - 1)]
        self._index += 1
        t = int(timestep)
        if kind == "P":
            prev = self.predictor.step(model_output, t, sample, generator=generator).prev_sample
        else:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev = self.langevin_step(model_output, t, sample, noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# name -> (scheduler class, config overrides). All share the pipeline's noise schedule and
# prediction type through `from_config`.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    # Latents are not images in [-1, 1]: no clipping of the predicted sample (diffusers' DDIM and
    # DDPM clip by default; Stable Diffusion's configs turn it off, as here).
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "ddpm": (DDPMScheduler, {"clip_sample": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "pc-langevin": (LangevinCorrectorScheduler, {"corrector_steps": 1, "snr": 0.1}),
    # For latent consistency models (distilled with unet.distill): a few steps, no guidance batch.
    "lcm": (LCMScheduler, {}),
}

# A latent consistency model's steps when none are asked for (LCM, Luo et al. 2023: 2-8 steps).
LCM_STEPS = 4


def sampling_defaults(pipe) -> dict:
    """Sampling arguments a pipeline needs beyond its ``__call__``'s defaults: with an LCM
    scheduler, ``LCM_STEPS`` steps, and for a UNet without a guidance embedding (an LCM-LoRA on
    its base model) guidance scale 1: the student learnt the guided teacher, so a guidance batch
    would apply guidance twice."""
    if not isinstance(pipe.scheduler, LCMScheduler):
        return {}
    defaults = {"num_inference_steps": LCM_STEPS}
    if pipe.unet.config.time_cond_proj_dim is None:
        defaults["guidance_scale"] = 1.0
    return defaults


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """Build the scheduler called ``name`` from another scheduler's ``config``.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
