"""Stage ``clip``: a small CLIPModel trained contrastively on (image, caption) pairs.

The InfoNCE loss of Radford et al. 2021 (CLIP), as ``CLIPModel(return_loss=True)`` computes it.
The text tower becomes the pipeline's text encoder (``out/text_encoder`` + ``out/tokenizer``);
the whole model is kept in ``out/clip`` as the run's evaluator (CLIP score).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from ldm_pipeline.evaluation.metrics import clip_pixel_values
from ldm_pipeline.loading import load_component
from ldm_pipeline.presets import get_preset, text_config, vision_config
from ldm_pipeline.tokenizer import load_clip_tokenizer, token_ids

from .checkpoint import GeneratorState
from .config import RunConfig
from .data import ImageSet
from .loop import check_finite, make_optimizer, run_loop, stage_checkpoints
from .seeds import seed_of


def text_tower(clip: CLIPModel) -> CLIPTextModel:
    """A standalone `CLIPTextModel` holding the CLIP model's text transformer weights."""
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    return text


def train_clip(
    cfg: RunConfig, train: ImageSet, out: Path, accelerator: Accelerator, resume: Path | None = None
) -> dict:
    """Train (or load, with ``clip.pretrained``) the text encoder; save it and the tokenizer."""
    c = cfg.clip
    preset = get_preset(cfg.model)
    if c.pretrained:
        text_encoder = load_component(CLIPTextModel, c.pretrained, "text_encoder", cfg.allow_pickle)
        tokenizer = load_component(CLIPTokenizer, c.pretrained, "tokenizer")
        metrics: dict = {"pretrained": c.pretrained}
    else:
        tokenizer = load_clip_tokenizer(preset.text.max_length)
        config = CLIPConfig(text_config=text_config(preset).to_dict(), vision_config=vision_config(preset).to_dict())
        config.projection_dim = preset.text.projection_dim
        clip = CLIPModel(config)
        optimizer = make_optimizer(clip.parameters(), c)
        clip, optimizer = accelerator.prepare(clip, optimizer)
        batches = train.batches(
            c.batch_size, c.gradient_accumulation_steps, seed_of(cfg.seed, "clip.batches"), accelerator
        )
        caption_gen = torch.Generator().manual_seed(seed_of(cfg.seed, "clip.captions"))
        side = config.vision_config.image_size

        def compute_loss(step: int) -> dict[str, torch.Tensor]:
            batch = next(batches)
            pixels, index = batch.pixels, batch.index
            images = pixels.float_batch(index).to(accelerator.device)
            if images.shape[-2:] != (side, side):  # an aspect bucket: the vision tower is square
                images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
            ids = token_ids(tokenizer, pixels.pick_captions(index, caption_gen))
            images = clip_pixel_values(images)
            output = clip(input_ids=ids.to(accelerator.device), pixel_values=images, return_loss=True)
            return {"loss": output.loss}

        stateful = {"batches": batches, "caption_generator": GeneratorState(caption_gen)}
        checkpoints = stage_checkpoints(out, "clip", c, stateful, resume)
        result = run_loop(accelerator, clip, optimizer, compute_loss, c, desc="clip", checkpoints=checkpoints)
        clip = accelerator.unwrap_model(clip)
        text_encoder = text_tower(clip)
        metrics = {"steps": result.steps, "minutes": round(result.minutes, 2), "final_loss": result.final_loss}
        check_finite(clip, "the CLIP model")
        if accelerator.is_main_process:
            clip.save_pretrained(out / "clip")
            tokenizer.save_pretrained(out / "clip")
            result.save(out / "logs" / "clip_losses.json")
    if accelerator.is_main_process:
        text_encoder.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
    accelerator.wait_for_everyone()
    return metrics
