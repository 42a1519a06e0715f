"""LoRA adapters (Hu et al. 2022) for the UNet stage: peft injects them, diffusers' format saves them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers

from ldm_pipeline.pipeline import LatentDiffusionPipeline

from .config import LoRAConfig


def add_lora(model: torch.nn.Module, lora: LoRAConfig, target_modules: list[str]) -> None:
    """Freeze ``model`` and give it trainable peft LoRA adapters (named "default") on ``target_modules``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or lora.rank,
        lora_dropout=lora.dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
        use_dora=lora.use_dora,
    )
    model.requires_grad_(False)
    # peft's own injection: transformers' add_adapter demands a newer peft than the registry has.
    inject_adapter_in_model(config, model, adapter_name="default")
    model.peft_config = {"default": config}


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """``model`` without its peft adapters for the block: the model they were trained on (peft's
    ``enable_adapters``, which leaves the adapters trainable again afterwards)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_lora(folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """The adapters in diffusers' LoRA format (``pytorch_lora_weights.safetensors`` + metadata),
    as ``StableDiffusionPipeline.load_lora_weights(folder)`` reads them."""
    from peft.utils import get_peft_model_state_dict

    layers: dict = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    if text_encoder is not None:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        layers["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    LatentDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **layers)
