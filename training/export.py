"""Turn a UNet checkpoint into what the finished run would have saved: ``ldm export``.

The checkpoint holds the trained weights, the optimiser and the EMA; the frozen parts come from
the run folder (or the pretrained model) named in the run's ``config.yaml``. The result is a
pipeline folder, or with ``unet.lora`` the LoRA folder, that loads like the final one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import load_config
from .loop import trainable
from .unet import frozen_parts, sampling_scheduler, save_outputs, trained_modules


def export_checkpoint(checkpoint: str | Path, output: str | Path, use_ema: bool = True) -> Path:
    """Write the pipeline (or LoRA) of a UNet checkpoint under ``output``; returns the folder written.

    Args:
        checkpoint: ``<run>/checkpoints/unet/step-N``.
        output: a folder; ``pipeline/`` or ``lora/`` is written inside it.
        use_ema: the EMA weights (what a finished run saves) rather than the raw ones.

    Raises:
        CheckpointError: not a UNet checkpoint of a run folder, or it does not fit the run's model.
    """
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent.parent
    if checkpoint.parent.name != "unet" or not (run / "config.yaml").is_file():
        raise CheckpointError(f"{checkpoint} is not a UNet checkpoint of a run (<run>/checkpoints/unet/step-N)")
    cfg = load_config(run / "config.yaml")
    _, state, _ = load_checkpoint(checkpoint)
    vae, text_encoder, tokenizer = frozen_parts(cfg, run)
    model = trained_modules(cfg, text_encoder)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if expected - set(state["model"]):
        raise CheckpointError(
            f"{checkpoint} does not fit the run's model: missing {sorted(expected - set(state['model']))[:5]}"
        )
    model.load_state_dict(state["model"], strict=False)
    if use_ema and "ema" in state:
        with torch.no_grad():
            for param, shadow in zip(trainable(model), state["ema"]["shadow_params"], strict=True):
                param.copy_(shadow)
    return save_outputs(Path(output), cfg, vae, text_encoder, tokenizer, model, sampling_scheduler(cfg))
