"""The UNet stage's latent consistency distillation (``unet.distill``): the student, its target
and one step's loss, on the stage's own batches of cached latents and caption embeddings.

The maths is training/consistency.py. Full student (no ``unet.lora``): the teacher's UNet widened
with a guidance-scale embedding (``time_cond_proj_dim``, zero-initialised so that it starts as the
teacher), a frozen teacher beside it and a target network that follows the student by an EMA.
LCM-LoRA (``unet.lora``): adapters on the teacher's UNet; the teacher is the same UNet with the
adapters off and the target is the student itself without gradients (LCM-LoRA, section 3).
"""

from __future__ import annotations

import copy
import inspect

import torch
from diffusers import LCMScheduler, UNet2DConditionModel

from ldm_pipeline.pipeline import LatentDiffusionPipeline

from .config import DistillConfig
from .consistency import (
    SkippingSolver,
    consistency_loss,
    consistency_output,
    guided,
    predicted_noise,
    predicted_origin,
)
from .lora import adapters_off


def lcm_student(unet: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """``unet`` with a guidance-scale input (``time_cond_proj_dim``) whose projection starts at zero."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"widening the UNet: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    if (student.device, student.dtype) != (unet.device, unet.dtype):
        student = student.to(unet.device, unet.dtype)
    return student


def default_guidance_scale() -> float:
    """The guidance scale our pipeline samples with when none is given (the teacher's default)."""
    return inspect.signature(LatentDiffusionPipeline.__call__).parameters["guidance_scale"].default


def lcm_scheduler(sampler) -> LCMScheduler:
    """The scheduler a distilled pipeline samples with: LCM's, on the teacher's noise schedule."""
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    return LCMScheduler.from_config({k: v for k, v in sampler.config.items() if k in accepted})


class ConsistencyLoss:
    """One step's latent consistency distillation loss (LCM, Algorithm 1) on the batches, noise
    and captions of ``base`` (the stage's `DenoisingLoss`): z_0 from the cached posterior, noised
    to a teacher timestep t_{n+k}; the student's f there; the guided teacher's DDIM step to t_n;
    the target's f at t_n (no gradient); their pseudo-Huber or L2 distance."""

    def __init__(self, base, d: DistillConfig, teacher, target, accelerator):
        self.base, self.d = base, d
        self.batches, self.generator = base.batches, base.generator  # checkpointed by the stage
        self.teacher, self.target, self.accelerator = teacher, target, accelerator
        self.kind = base.c.prediction_type
        self.alphas = base.noise_scheduler.alphas_cumprod
        self.solver = SkippingSolver.from_schedule(base.noise_scheduler, d.teacher_steps)
        low, high = d.guidance_scale or [default_guidance_scale()] * 2
        self.scales = (float(low), float(high))
        self._target_step: int | None = None

    def _unet(self) -> UNet2DConditionModel:
        return self.accelerator.unwrap_model(self.base.model).unet

    def _follow(self, step: int) -> None:
        """Move the full student's target one EMA step towards the student, once per optimiser step."""
        if self.target is None or self._target_step == step:
            return
        self._target_step = step
        with torch.no_grad():
            student = [p.detach() for p in self._unet().parameters()]
            torch._foreach_lerp_(list(self.target.parameters()), student, 1 - self.d.target_ema)

    def _guidance_input(self, w: torch.Tensor) -> torch.Tensor | None:
        dim = self._unet().config.time_cond_proj_dim
        if dim is None:
            return None
        return LatentDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)

    @torch.no_grad()
    def _teacher_step(self, x: torch.Tensor, t: torch.Tensor, cond, uncond, w, index) -> torch.Tensor:
        """x at t_n: one DDIM step of the teacher under guidance w from x at t_{n+k}."""
        inputs = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
        if self.teacher is not None:
            both = self.teacher(*inputs).float()
        else:  # LCM-LoRA: the same UNet with its adapters off
            with adapters_off(self._unet()):
                both = self.base.model(*inputs).float()
        x0, eps = [], []
        for out in both.chunk(2):
            x0.append(predicted_origin(out, t, x, self.alphas, self.kind))
            eps.append(predicted_noise(out, t, x, self.alphas, self.kind))
        return self.solver.step(guided(*x0, w), guided(*eps, w), index)

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        self._follow(step)
        batch = next(self.batches)
        p = self.base.noised(batch)
        n, part, device = len(batch.chunk), batch.part, p["z0"].device
        # Drawn for the whole micro-batch over all processes, then cut, as the base's draws are.
        index = torch.randint(len(self.solver.timesteps), (n,), generator=self.generator)[part]
        low, high = self.scales
        w = (low + (high - low) * torch.rand(n, generator=self.generator))[part] - 1
        start, end = self.solver.timesteps[index].to(device), self.solver.previous(index).to(device)
        x = self.base.noise_scheduler.add_noise(p["z0"], p["noise"], start)
        cond = p["cond"]
        uncond = self.base.embed([""] * len(start)).to(cond)
        w_input = self._guidance_input(w)
        w_input = None if w_input is None else w_input.to(device, x.dtype)
        pred = consistency_output(
            self._forward(self.base.model, x, start, cond, w_input), start, x, self.alphas, self.kind
        )
        x_prev = self._teacher_step(x, start, cond, uncond, w.to(device), index)
        with torch.no_grad():
            target_model = self.target if self.target is not None else self.base.model
            out = self._forward(target_model, x_prev, end, cond, w_input)
            target = consistency_output(out, end, x_prev, self.alphas, self.kind)
        return {"loss": consistency_loss(pred, target, self.d.loss, self.d.huber_c).mean()}

    @staticmethod
    def _forward(model, x, t, cond, w_input) -> torch.Tensor:
        return model(x, t, cond, timestep_cond=w_input).float()


def lcm_target(student: UNet2DConditionModel):
    """The full student's target network: a frozen copy that `ConsistencyLoss` moves by EMA."""
    return copy.deepcopy(student).requires_grad_(False).eval()
