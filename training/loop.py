"""The training loop every stage shares: Accelerate, AdamW, warm-up + cosine LR, EMA, progress.

A stage supplies ``compute_loss(step) -> dict`` (with a ``"loss"`` tensor to minimise) and,
optionally, ``after_step(step) -> dict`` for a second optimiser (the VAE's discriminator).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm_pipeline.hardware import default_mixed_precision


def make_accelerator(mixed_precision: str, seed: int) -> Accelerator:
    """An `Accelerator` for this process (CPU, one GPU, or one rank of a launch), seeded.

    ``mixed_precision="auto"`` picks bf16 where the hardware runs it fast, else fp32.
    """
    if mixed_precision == "auto":
        mixed_precision = default_mixed_precision()
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    # On a machine without an accelerator, cpu=True lets a multi-process launch (torchrun)
    # use the gloo backend instead of looking for GPUs.
    has_device = torch.cuda.is_available() or torch.backends.mps.is_available() or torch.xpu.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_device)
    set_seed(seed)
    return accelerator


def index_batches(num_items: int, batch_size: int, seed: int, accelerator: Accelerator) -> Iterator[torch.Tensor]:
    """Endless batches of dataset indices: a fresh permutation each epoch, split across processes.

    Each process draws ``batch_size`` indices per step from its own share of the permutation,
    so a launch with N processes sees N × batch_size samples per optimiser step.
    """
    if num_items < batch_size * accelerator.num_processes:
        raise ValueError(
            f"the dataset has {num_items} items, fewer than one global batch "
            f"({batch_size} × {accelerator.num_processes} processes)"
        )
    generator = torch.Generator().manual_seed(seed)
    global_batch = batch_size * accelerator.num_processes
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - global_batch + 1, global_batch):
            chunk = order[start : start + global_batch]
            yield chunk[accelerator.process_index * batch_size : (accelerator.process_index + 1) * batch_size]


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


def run_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[int], dict[str, torch.Tensor]],
    *,
    steps: int,
    warmup_steps: int,
    desc: str,
    max_minutes: float | None = None,
    ema: EMAModel | None = None,
    after_step: Callable[[int], dict[str, float]] | None = None,
    on_minute: Callable[[float], None] | None = None,
    max_grad_norm: float = 1.0,
    log_every: int = 10,
) -> LoopResult:
    """Run ``steps`` optimiser steps (or until ``max_minutes``), with a progress bar.

    ``model`` and ``optimizer`` must already be passed through ``accelerator.prepare``;
    ``compute_loss`` runs under the accelerator's autocast. ``on_minute(elapsed_minutes)`` is
    called after the first step past each whole minute of training.
    """
    lr_scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=min(warmup_steps, steps // 2), num_training_steps=steps
    )
    bar = tqdm(total=steps, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start = time.monotonic()
    losses: list[dict[str, float]] = []
    step = 0
    minutes_reported = 0
    model.train()
    while step < steps:
        with accelerator.autocast():
            terms = compute_loss(step)
        accelerator.backward(terms["loss"])
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        extra = after_step(step) if after_step is not None else {}
        step += 1
        if step % log_every == 0 or step == steps:
            entry = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}, **extra}
            entry["lr"] = lr_scheduler.get_last_lr()[0]
            losses.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
        bar.update()
        elapsed = (time.monotonic() - start) / 60
        if on_minute is not None and int(elapsed) > minutes_reported:
            minutes_reported = int(elapsed)
            on_minute(elapsed)
        if max_minutes is not None and elapsed > max_minutes:
            bar.write(f"{desc}: stopping at step {step} of {steps}: the {max_minutes} minute limit is reached")
            break
    bar.close()
    return LoopResult(steps=step, minutes=(time.monotonic() - start) / 60, losses=losses)
