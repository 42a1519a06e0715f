"""The training loop every stage shares: Accelerate, AdamW, LR schedule with warm-up, EMA, progress.

A stage supplies ``compute_loss(step) -> dict`` (with a ``"loss"`` tensor to minimise) and,
optionally, ``after_step(step) -> dict`` for a second optimiser (the VAE's discriminator),
``validation(steps_done)`` for samples of the weights as they stand (the UNet's validation
grids), and a `QualityCheck`: a measure of the model taken every so often while it trains, with
the bar at which the stage is done.
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
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm_pipeline.errors import InputError, UsageError
from ldm_pipeline.loading import non_finite_keys

from .checkpoint import CheckpointError, GeneratorState, load_checkpoint, save_checkpoint
from .config import StageConfig
from .hardware import default_mixed_precision


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
        raise InputError("mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
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


def zero3_init_disabled() -> contextlib.AbstractContextManager:
    """A context in which models are built whole under DeepSpeed ZeRO-3 (elsewhere: no effect).

    ZeRO-3 partitions every model created under its ``zero.Init``; frozen models that are only
    run (the VAE, a frozen text encoder) must stay whole on each process.
    """
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    return plugin.zero3_init_context_manager(enable=False) if plugin is not None else contextlib.nullcontext()


def log_images(accelerator: Accelerator, tag: str, images: list, step: int) -> None:
    """Log PIL images to the running trackers (TensorBoard, wandb) at ``step``."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(im.convert("RGB")) for im in images])
            tracker.writer.add_images(tag, batch, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im) for im in images]}, step=step)


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to save ``model`` when any weight is NaN or infinite (a diverged run)."""
    bad = non_finite_keys(model.state_dict())
    if bad:
        raise NonFiniteError(f"not saving {what}: non-finite weights in {bad[:5]}; the last checkpoint is kept")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (LoRA: the adapters only), in a fixed order for the optimiser and EMA."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class QualityCheck:
    """A stage's measure of quality, taken every ``every`` steps while it trains.

    ``measure()`` returns the value (higher is better: held-out PSNR in dB, adherence as a
    fraction). With a ``target`` the stage stops when the mean of the last ``window``
    measurements is at or above it (a window of two halves the variance of a sampled measure
    without sampling more at each check), and otherwise runs on to its ceilings (``steps``,
    ``max_minutes``). With ``parts`` (more measures, each with its own target: the emoji's
    held-out skin tone beside their R-precision) ``measure()`` returns a dict of every measure
    by name, and the stage stops when each one has reached its target.
    """

    name: str
    measure: Callable[[], float]
    every: int
    target: float | None = None
    # With the warmup_stable_decay LR schedule: the value at which the decay begins.
    decay_at: float | None = None
    # How a value is shown: "{:.1f} dB", "{:.3f}".
    fmt: str = "{:.3f}"
    window: int = 1
    # The other measures' targets, by name (None: measured and reported, no target).
    parts: dict[str, float | None] = field(default_factory=dict)

    def show(self, entry: dict[str, float]) -> str:
        """A measurement (``value`` and each part's) as text."""
        shown = [f"{self.name} {self.fmt.format(entry['value'])}"]
        return ", ".join(shown + [f"{name} {self.fmt.format(entry[name])}" for name in self.parts])

    def goal(self) -> str:
        """The targets as text ("" without one)."""
        if self.target is None:
            return ""
        goals = [self.fmt.format(self.target)] + [f"{n} {self.fmt.format(t)}" for n, t in self.parts.items() if t]
        return f" (target {', '.join(goals)})"

    def level(self, values: list[float]) -> float:
        """What is compared with the target: the mean of the last ``window`` values."""
        recent = values[-self.window :]
        return sum(recent) / len(recent)

    def levels(self, measured: list[dict[str, float]]) -> dict[str, float]:
        """Each part's level in ``measured`` (the quality entries)."""
        return {name: self.level([m[name] for m in measured]) for name in self.parts}

    def reached(self, measured: list[dict[str, float]]) -> bool:
        """Whether the value and every part with a target are at or above their targets."""
        if self.target is None or len(measured) < self.window:
            return False
        if self.level([m["value"] for m in measured]) < self.target:
            return False
        levels = self.levels(measured)
        return all(levels[name] >= target for name, target in self.parts.items() if target is not None)


@dataclass
class LoopResult:
    """What a stage's loop did: steps run, minutes taken, the loss curve, the quality measured."""

    steps: int
    minutes: float
    losses: list[dict[str, float]] = field(default_factory=list)
    # Optimiser steps skipped for a non-finite loss or gradient.
    skipped: int = 0
    # Each quality measurement: {"step", "minutes", "value"}.
    quality: list[dict[str, float]] = field(default_factory=list)
    # With a target: whether the last measurement reached it (None without a target).
    reached: bool | None = None
    # Why the loop ended: "target", "steps" or "minutes".
    stopped_by: str = "steps"

    @property
    def final_loss(self) -> float:
        tail = [entry["loss"] for entry in self.losses[-20:]]
        return sum(tail) / len(tail) if tail else math.nan

    def save(self, path: Path) -> None:
        record = {"steps": self.steps, "minutes": self.minutes, "skipped": self.skipped, "losses": self.losses}
        if self.quality:
            record["quality"] = self.quality
        path.write_text(json.dumps(record))

    def quality_report(self, check: QualityCheck | None) -> dict:
        """The stage report's quality entries: the last value, the target and whether it was met."""
        if check is None or not self.quality:
            return {}
        level = check.level([q["value"] for q in self.quality])
        report = {"quality_metric": check.name, "quality": level, "quality_curve": self.quality}
        if check.parts:
            report["quality_parts"] = check.levels(self.quality)
        if check.target is not None:
            report.update(target=check.target, target_reached=bool(self.reached), stopped_by=self.stopped_by)
            if check.parts:
                report["part_targets"] = dict(check.parts)
        return report


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


@dataclass
class WarmupStableDecay:
    """Warm-up, a constant LR, then a linear decay to ``floor`` × the LR: the schedule for a
    stage whose length is not known in advance (Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"; Hu et al. 2024, MiniCPM).

    The loop starts the decay (`begin`) when the stage's quality reaches its ``decay_at``, the
    decay then lasting ``fraction`` × the updates before it, or when a ceiling comes near, the
    decay then ending at it. After the decay the LR stays at the floor.
    """

    warmup: int
    fraction: float
    floor: float
    start: int | None = None
    end: int | None = None

    def __call__(self, update: int) -> float:
        if update < self.warmup:  # as diffusers' warm-up
            return update / max(1, self.warmup)
        if self.start is None or update < self.start:
            return 1.0
        if update >= self.end:
            return self.floor
        return 1.0 - (1.0 - self.floor) * (update - self.start) / (self.end - self.start)

    def begin(self, update: int, end: int) -> None:
        """Decay from ``update`` to ``end`` (optimiser updates), unless the decay has begun."""
        if self.start is None:
            self.start, self.end = update, max(end, update + 1)


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """diffusers' named LR schedule (``get_scheduler``) as a factor of the base LR at each step."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup = min(warmup_steps, total_steps // 2)
    return get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=total_steps).lr_lambdas[0]


@dataclass
class Checkpoints:
    """Where and how often a stage checkpoints, what besides the model it saves, where it resumes.

    ``stateful`` maps names to objects with ``state_dict()`` / ``load_state_dict()`` (a second
    optimiser, the batch sampler); `GeneratorState` entries are saved per process.
    """

    folder: Path
    every: int | None
    keep: int
    stateful: dict[str, Any] = field(default_factory=dict)
    resume: Path | None = None
    meta: dict = field(default_factory=dict)


def stage_checkpoints(
    out: Path, stage: str, cfg: StageConfig, stateful: dict[str, Any], resume: Path | None
) -> Checkpoints:
    """A stage's checkpoints under ``<out>/checkpoints/<stage>/``, as its config asks."""
    return Checkpoints(
        out / "checkpoints" / stage, cfg.checkpoint_every, cfg.checkpoint_keep, stateful, resume, {"stage": stage}
    )


class NonFiniteError(UsageError, FloatingPointError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters and the buffers: what a checkpoint must restore (frozen weights
    come back from where they were loaded)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(dict(model.named_buffers()))
    return state


def _capture(accelerator, model, optimizer, lr_scheduler, ema, ckpt: Checkpoints, loop: dict) -> dict[str, Any] | None:
    """The whole training state; per-process RNG states gathered from every process."""
    per_rank = {"torch": torch.get_rng_state()}
    per_rank.update({n: o.generator.get_state() for n, o in ckpt.stateful.items() if isinstance(o, GeneratorState)})
    gathered = {n: accelerator.gather(t.unsqueeze(0).to(accelerator.device)).cpu() for n, t in per_rank.items()}
    if not accelerator.is_main_process:
        return None
    schedule = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "loop": loop,
        "model": _trainable_state(accelerator.unwrap_model(model)),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": schedule,
        "rng": gathered,
        "stateful": {n: o.state_dict() for n, o in ckpt.stateful.items() if not isinstance(o, GeneratorState)},
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    return state


def _restore(accelerator, model, optimizer, lr_scheduler, ema, ckpt: Checkpoints) -> dict:
    """Load ``ckpt.resume`` into the training objects; returns the loop's saved counters."""
    _, state, _ = load_checkpoint(ckpt.resume)
    saved_processes = len(state["rng"]["torch"])
    if saved_processes != accelerator.num_processes:
        # Each process's random streams and share of every batch depend on the world size.
        raise CheckpointError(
            f"checkpoint {ckpt.resume} was written by {saved_processes} process(es); this run has "
            f"{accelerator.num_processes}: resume with {saved_processes}"
        )
    inner = accelerator.unwrap_model(model)
    expected = _trainable_state(inner)
    missing = sorted(set(expected) - set(state["model"]))
    unexpected = sorted(set(state["model"]) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt.resume} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    inner.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    # Checkpoints store tensors contiguous; a channels-last parameter's moments must get its
    # layout back, or fused kernels that walk raw storage would pair the wrong elements.
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for name, value in moments.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    moments[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    lr_scheduler.load_state_dict({**state["lr_scheduler"], "lr_lambdas": [None]})
    if ema is not None:
        ema.load_state_dict(state["ema"])
        ema.shadow_params = [
            torch.empty_like(p, dtype=s.dtype).copy_(s)
            for p, s in zip(trainable(inner), ema.shadow_params, strict=True)
        ]
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    for name, obj in ckpt.stateful.items():
        if isinstance(obj, GeneratorState):
            obj.generator.set_state(state["rng"][name][accelerator.process_index].clone())
        else:
            obj.load_state_dict(state["stateful"][name])
    torch.set_rng_state(state["rng"]["torch"][accelerator.process_index].clone())
    return state["loop"]


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
    validation: Callable[[int], None] | None = None,
    on_minute: Callable[[float], None] | None = None,
    checkpoints: Checkpoints | None = None,
    quality: QualityCheck | None = None,
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

    A step whose loss or gradient norm is not finite is skipped (no update, counted and logged);
    more than ``cfg.max_nonfinite_steps`` in a row raise `NonFiniteError`. With ``checkpoints``,
    the whole state is saved every ``checkpoints.every`` steps and at the end, and a run resumes
    from ``checkpoints.resume`` exactly where that checkpoint left it (a resumed time-fitted run
    keeps the step plan it had).

    With ``quality``, the model is measured every ``quality.every`` steps and when the loop ends
    (on the main process; the value is shared with the others), the value shown on the progress
    bar and logged; reaching ``quality.target`` ends the loop.
    """
    steps, max_minutes, accumulate = cfg.steps, cfg.max_minutes, cfg.gradient_accumulation_steps
    if steps is None and max_minutes is None:
        raise ValueError("run_loop needs steps, max_minutes or both")
    limit = steps if steps is not None else sys.maxsize
    uses_wsd = cfg.lr_scheduler == "warmup_stable_decay"
    wsd = WarmupStableDecay(cfg.warmup_steps, cfg.decay_fraction, cfg.lr_floor)

    def schedule(total: int) -> Callable[[int], float]:
        return wsd if uses_wsd else lr_factor(cfg.lr_scheduler, cfg.warmup_steps, total)

    plan = {"steps": limit, "factor": schedule(limit)}
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: plan["factor"](step))
    losses: list[dict[str, float]] = []
    measured: list[dict[str, float]] = []
    step = skipped = skipped_in_a_row = 0
    elapsed_before = 0.0
    resumed = checkpoints is not None and checkpoints.resume is not None
    replan = False
    if resumed:
        loop = _restore(accelerator, model, optimizer, lr_scheduler, ema, checkpoints)
        step, skipped, losses, elapsed_before = loop["step"], loop["skipped"], loop["losses"], loop["seconds"]
        measured = loop.get("quality", [])
        # The same ceilings: the step plan it had (an exact resume). Raised ones (continuing a run
        # that stopped short of its target): plan anew, timing the steps again.
        replan = loop.get("ceilings", [steps, max_minutes]) != [steps, max_minutes]
        plan["steps"] = limit if replan else loop["plan_steps"]
        plan["factor"] = schedule(plan["steps"])
        wsd.start, wsd.end = loop.get("decay", [None, None])
    # smoothing=0: the estimate uses the mean pace since the start, quality checks included, rather
    # than the last few steps' (which made it jump many-fold right after each check).
    bar = tqdm(
        total=steps,
        initial=step,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
        smoothing=0,
    )
    start = time.monotonic() - elapsed_before
    pace_start = start
    first_step = step
    minutes_reported = int(elapsed_before / 60)

    def save(at_step: int) -> None:
        loop = {
            "step": at_step,
            "plan_steps": plan["steps"],
            "ceilings": [steps, max_minutes],
            "decay": [wsd.start, wsd.end],
            "skipped": skipped,
            "losses": losses,
            "quality": measured,
            "seconds": time.monotonic() - start,
        }
        state = _capture(accelerator, model, optimizer, lr_scheduler, ema, checkpoints, loop)
        if state is not None:
            save_checkpoint(checkpoints.folder, at_step, state, checkpoints.keep, checkpoints.meta)
        accelerator.wait_for_everyone()

    postfix: dict[str, str] = {}
    if measured:
        postfix[quality.name] = quality.fmt.format(measured[-1]["value"])

    def measure() -> float:
        """Measure on the main process, share the values, show them; returns the main value."""
        names = [quality.name, *quality.parts]
        values = [0.0] * len(names)
        if accelerator.is_main_process:
            got = quality.measure()
            got = got if isinstance(got, dict) else {quality.name: got}
            values = [float(got[name]) for name in names]
        shared = broadcast(torch.tensor(values, dtype=torch.float64).to(accelerator.device)).cpu().tolist()
        value, parts = shared[0], dict(zip(names[1:], shared[1:], strict=True))
        model.train()
        entry = {"step": step, "minutes": round((time.monotonic() - start) / 60, 3), "value": value, **parts}
        measured.append(entry)
        accelerator.log({f"{desc}/{name}": v for name, v in zip(names, shared, strict=True)}, step=step)
        postfix[quality.name] = quality.fmt.format(value)
        bar.set_postfix(postfix, refresh=False)
        bar.write(f"{desc}: step {step}: {quality.show(entry)}{quality.goal()}")
        return value

    def reached() -> bool:
        return quality.reached(measured)

    stopped_by = "steps"
    if measured and reached():
        stopped_by = "target"  # resumed from the checkpoint written when the target was reached
    model.train()
    while step < plan["steps"] and stopped_by != "target":
        for micro in range(accumulate):
            # Gradients are all-reduced across processes on the last micro-batch only.
            with accelerator.no_sync(model) if micro < accumulate - 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    terms = compute_loss(step)
                accelerator.backward(terms["loss"] / accumulate)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        # fp16's gradient scaler skips its own overflow steps; otherwise a non-finite loss or
        # gradient would poison the weights, the optimiser moments and the EMA.
        finite = bool(torch.isfinite(terms["loss"].detach())) and (
            accelerator.scaler is not None or grad_norm is None or bool(torch.isfinite(grad_norm))
        )
        if finite:
            optimizer.step()
            lr_scheduler.step()
            skipped_in_a_row = 0
        else:
            skipped += 1
            skipped_in_a_row += 1
            bar.write(f"{desc}: step {step + 1}: non-finite loss or gradient, update skipped ({skipped} so far)")
            if skipped_in_a_row > cfg.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{desc}: {skipped_in_a_row} steps in a row up to step {step + 1} had a non-finite loss or "
                    f"gradient (limit max_nonfinite_steps={cfg.max_nonfinite_steps}); the last checkpoint is kept"
                )
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and finite:
            ema.step(trainable(model))
        extra = after_step(step) if after_step is not None else {}
        step += 1
        if validation is not None:
            validation(step)
        if step - first_step == _PACE_FROM_STEP:
            pace_start = time.monotonic()
        if step % log_every == 0 or step == plan["steps"]:
            entry = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}, **extra}
            entry["lr"] = lr_scheduler.get_last_lr()[0]
            entry["skipped"] = skipped
            losses.append(entry)
            accelerator.log({f"{desc}/{k}": v for k, v in entry.items() if k != "step"}, step=step)
            postfix["loss"] = f"{entry['loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)
        bar.update()
        if quality is not None and step % quality.every == 0:
            value = measure()
            if reached():
                stopped_by = "target"
                bar.write(f"{desc}: target reached at step {step}")
                break
            if uses_wsd and wsd.start is None and quality.decay_at is not None and value >= quality.decay_at:
                updates = lr_scheduler.last_epoch
                wsd.begin(updates, updates + max(1, round(cfg.decay_fraction * updates)))
                bar.write(f"{desc}: step {step}: the LR decays over the next {wsd.end - wsd.start} steps")
        now = time.monotonic()
        elapsed = (now - start) / 60
        new_minute = int(elapsed) > minutes_reported
        refit = (replan or not resumed) and max_minutes is not None
        timed = step - first_step
        if refit and (timed == _FIT_AT_STEP or (new_minute and timed > _FIT_AT_STEP)):
            seconds_per_step = (now - pace_start) / (timed - _PACE_FROM_STEP)
            fits = step + int((max_minutes * 60 - (now - start)) / seconds_per_step)
            # Every process must plan the same number of steps: take the slowest one's.
            plan["steps"] = max(step, min(limit, int(accelerator.gather(torch.tensor([fits])).min())))
            plan["factor"] = schedule(plan["steps"])
            bar.total = plan["steps"]
        if uses_wsd and plan["steps"] - step <= cfg.decay_fraction * step:  # a ceiling nears: decay to it
            wsd.begin(lr_scheduler.last_epoch, lr_scheduler.last_epoch + plan["steps"] - step)
        if new_minute:
            minutes_reported = int(elapsed)
            if on_minute is not None:
                on_minute(elapsed)
        if max_minutes is not None and elapsed > max_minutes:
            bar.write(f"{desc}: stopping at step {step} of {plan['steps']}: the {max_minutes} minute limit is reached")
            stopped_by = "minutes"
            break
        if checkpoints is not None and checkpoints.every and step % checkpoints.every == 0 and step < plan["steps"]:
            save(step)
    if stopped_by == "steps" and step < limit:
        stopped_by = "minutes"  # the steps planned were those that fit in max_minutes
    if quality is not None and (not measured or measured[-1]["step"] != step):
        measure()
    bar.close()
    if checkpoints is not None:
        save(step)
    return LoopResult(
        steps=step,
        minutes=(time.monotonic() - start) / 60,
        losses=losses,
        skipped=skipped,
        quality=measured,
        reached=None if quality is None or quality.target is None else reached(),
        stopped_by=stopped_by,
    )
