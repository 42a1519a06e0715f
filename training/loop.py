"""The training loop every stage shares: Accelerate, AdamW, LR schedule with warm-up, EMA, progress.

A stage supplies ``compute_loss(step) -> dict`` (with a ``"loss"`` tensor to minimise) and,
optionally, ``after_step(step) -> dict`` for a second optimiser (the VAE's discriminator).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm_pipeline.hardware import default_mixed_precision

from .config import StageConfig


def make_accelerator(
    mixed_precision: str, seed: int, report_to: str = "none", logging_dir: str | Path | None = None
) -> Accelerator:
    """An `Accelerator` for this process (CPU, one GPU, or one rank of a launch), seeded.

    ``mixed_precision="auto"`` picks bf16 where the hardware runs it fast, else fp32. Models
    keep fp32 weights and run under autocast, so trainable parameters stay fp32 under bf16 and
    fp16 alike. ``report_to`` ("tensorboard", "wandb" or "none") starts that tracker, writing under
    ``logging_dir``.
    """
    if mixed_precision == "auto":
        mixed_precision = default_mixed_precision()
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    # On a machine without an accelerator, cpu=True lets a multi-process launch (torchrun)
    # use the gloo backend instead of looking for GPUs.
    has_device = torch.cuda.is_available() or torch.backends.mps.is_available() or torch.xpu.is_available()
    log_with = None if report_to == "none" else report_to
    accelerator = Accelerator(
        mixed_precision=mixed_precision, cpu=not has_device, log_with=log_with, project_dir=logging_dir
    )
    if log_with is not None:
        accelerator.init_trackers("ldm")
    set_seed(seed)
    return accelerator


def log_images(accelerator: Accelerator, tag: str, images: list, step: int) -> None:
    """Log PIL images to the running trackers (TensorBoard, wandb) at ``step``."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(im.convert("RGB")) for im in images])
            tracker.writer.add_images(tag, batch, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im) for im in images]}, step=step)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (LoRA: the adapters only), in a fixed order for the optimiser and EMA."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class LoopResult:
    """What a stage's loop did: steps run, minutes taken, the loss curve."""

    steps: int
    minutes: float
    losses: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = [entry["loss"] for entry in self.losses[-20:]]
        return sum(tail) / len(tail) if tail else math.nan

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"steps": self.steps, "minutes": self.minutes, "losses": self.losses}))


# Steps run before the loop times itself to fit ``steps`` to ``max_minutes`` (the first few are slow).
_PACE_FROM_STEP = 5
_FIT_AT_STEP = 25


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: StageConfig, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """The stage's optimiser: AdamW (fused kernel where the device has one, else foreach) or 8-bit AdamW."""
    params = [p for p in params if p.requires_grad]
    hyper = {"lr": cfg.learning_rate, "betas": betas, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, **hyper)
    try:
        return torch.optim.AdamW(params, **hyper, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, **hyper, foreach=True)


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """diffusers' named LR schedule (``get_scheduler``) as a factor of the base LR at each step."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup = min(warmup_steps, total_steps // 2)
    return get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=total_steps).lr_lambdas[0]


def run_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[int], dict[str, torch.Tensor]],
    cfg: StageConfig,
    *,
    desc: str,
    ema: EMAModel | None = None,
    after_step: Callable[[int], dict[str, float]] | None = None,
    on_minute: Callable[[float], None] | None = None,
    log_every: int = 10,
) -> LoopResult:
    """Run ``cfg.steps`` optimiser steps with a progress bar, fitted to ``cfg.max_minutes`` when set.

    Each step runs ``cfg.gradient_accumulation_steps`` micro-batches (``compute_loss`` once each,
    under the accelerator's autocast), clips the gradient norm to ``cfg.max_grad_norm``, steps
    the optimiser, the ``cfg.lr_scheduler`` schedule (with warm-up) and the EMA.

    With ``max_minutes`` the loop times its own steps (after step 25, then at each whole minute)
    and plans ``min(steps, steps that fit in max_minutes)`` (``steps=None``: all that fit), so that
    the LR schedule runs its whole course in the time on any machine; it also stops at the limit.
    ``model`` and ``optimizer`` must already be passed through ``accelerator.prepare``.
    ``on_minute(elapsed_minutes)`` is called after the first step past each whole minute.
    """
    steps, max_minutes, accumulate = cfg.steps, cfg.max_minutes, cfg.gradient_accumulation_steps
    if steps is None and max_minutes is None:
        raise ValueError("run_loop needs steps, max_minutes or both")
    limit = steps if steps is not None else sys.maxsize
    plan = {"steps": limit, "factor": lr_factor(cfg.lr_scheduler, cfg.warmup_steps, limit)}
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: plan["factor"](step))
    bar = tqdm(total=steps, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start = time.monotonic()
    pace_start = start
    losses: list[dict[str, float]] = []
    step = 0
    minutes_reported = 0
    model.train()
    while step < plan["steps"]:
        for micro in range(accumulate):
            # Gradients are all-reduced across processes on the last micro-batch only.
            with accelerator.no_sync(model) if micro < accumulate - 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    terms = compute_loss(step)
                accelerator.backward(terms["loss"] / accumulate)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trainable(model))
        extra = after_step(step) if after_step is not None else {}
        step += 1
        if step == _PACE_FROM_STEP:
            pace_start = time.monotonic()
        if step % log_every == 0 or step == plan["steps"]:
            entry = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}, **extra}
            entry["lr"] = lr_scheduler.get_last_lr()[0]
            losses.append(entry)
            accelerator.log({f"{desc}/{k}": v for k, v in entry.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
        bar.update()
        now = time.monotonic()
        elapsed = (now - start) / 60
        new_minute = int(elapsed) > minutes_reported
        if max_minutes is not None and (step == _FIT_AT_STEP or (new_minute and step > _FIT_AT_STEP)):
            seconds_per_step = (now - pace_start) / (step - _PACE_FROM_STEP)
            fits = step + int((max_minutes * 60 - (now - start)) / seconds_per_step)
            # Every process must plan the same number of steps: take the slowest one's.
            plan["steps"] = max(step, min(limit, int(accelerator.gather(torch.tensor([fits])).min())))
            plan["factor"] = lr_factor(cfg.lr_scheduler, cfg.warmup_steps, plan["steps"])
            bar.total = plan["steps"]
        if new_minute:
            minutes_reported = int(elapsed)
            if on_minute is not None:
                on_minute(elapsed)
        if max_minutes is not None and elapsed > max_minutes:
            bar.write(f"{desc}: stopping at step {step} of {plan['steps']}: the {max_minutes} minute limit is reached")
            break
    bar.close()
    return LoopResult(steps=step, minutes=(time.monotonic() - start) / 60, losses=losses)
