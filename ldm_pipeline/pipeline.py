"""`LatentDiffusionPipeline`: text-to-image sampling in a VAE's latent space.

The reverse process of the score SDE is integrated by a diffusers scheduler; the UNet gives the
noise (or v) prediction, and classifier-free guidance (Ho & Salimans 2022) mixes the conditional
and unconditional predictions, both computed in one batched UNet call.

Saved folders use the Stable Diffusion layout, so stock ``StableDiffusionPipeline`` and
``DiffusionPipeline`` load them too (see ``save_pretrained``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionMixin, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import InputError
from .memory import check_sampling_fits
from .tokenizer import token_ids
from .tracing import UNetTraces

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The class name written to model_index.json: stock diffusers resolves it, so a folder saved here
# loads with `DiffusionPipeline.from_pretrained` anywhere diffusers runs.
SAVED_CLASS_NAME = "StableDiffusionPipeline"


def _prefix_text_encoder_keys(path: str) -> None:
    """Store CLIP text weights under ``text_model.*``, as released Stable Diffusion checkpoints do.

    transformers 5 saves ``CLIPTextModel`` without the prefix, which transformers 4 would not
    match (it would initialise the encoder at random); with the prefix both versions load it.
    """
    if not os.path.isfile(path):
        return
    tensors = load_file(path)
    if all(k.startswith("text_model.") for k in tensors):
        return
    save_file(
        {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()},
        path,
        metadata={"format": "pt"},
    )


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionMixin, StableDiffusionLoraLoaderMixin):
    """Text-to-image latent diffusion: CLIP text encoder, conditional UNet, scheduler, VAE.

    Args:
        vae: decodes latents to images; its ``scaling_factor`` config entry normalises latents.
        text_encoder: CLIP text tower whose last hidden state conditions the UNet.
        tokenizer: CLIP tokenizer; ``model_max_length`` sets the prompt length.
        unet: predicts noise (or v, per the scheduler's ``prediction_type``) from noised latents.
        scheduler: any diffusers scheduler of the Karras family (DDIM, DPM-Solver++, Euler, ...).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._unet_traces = UNetTraces()
        self._unet_tracing = True

    @property
    def default_size(self) -> int:
        """Image side in pixels that the UNet was built for (its latent size times the VAE factor)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a step-end callback to stop the denoising loop."""
        return self._interrupt

    def enable_unet_tracing(self) -> None:
        """Replay a traced UNet forward on the CPU for shapes met in an earlier call (the default).

        The trace runs the same kernels on the same weights, so images are unchanged (each trace is
        checked against an eager forward when made); it skips Python's per-module cost, which
        dominates small UNets on a CPU. A UNet with adapters, hooks, custom attention processors,
        FreeU or ``compile()``, in training mode, under autocast or off the CPU always runs eagerly.
        See ``ldm_pipeline/tracing.py``.
        """
        self._unet_tracing = True

    def disable_unet_tracing(self) -> None:
        """Run the UNet eagerly in every call, and drop the traces made so far."""
        self._unet_tracing = False
        self._unet_traces.clear()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save in the Stable Diffusion folder layout (safetensors + JSON).

        ``model_index.json`` names ``StableDiffusionPipeline`` with no safety checker, so stock
        ``StableDiffusionPipeline.from_pretrained`` and ``DiffusionPipeline.from_pretrained`` load
        the folder; ``LatentDiffusionPipeline.from_pretrained`` loads it as this class. The
        tokenizer also gets ``vocab.json`` and ``merges.txt`` for readers without ``tokenizer.json``.
        """
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = SAVED_CLASS_NAME
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
        index["requires_safety_checker"] = False
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        self.tokenizer.backend_tokenizer.model.save(os.path.join(save_directory, "tokenizer"))
        _prefix_text_encoder_keys(os.path.join(save_directory, "text_encoder", "model.safetensors"))

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        num_inference_steps: int,
        num_images_per_prompt: int,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
        guidance_scale: float = 1.0,
    ) -> None:
        """Raise a ``ValueError`` naming the first problem with the call's arguments."""
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not (math.isfinite(guidance_scale))
        ):
            raise InputError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor != 0:
                raise InputError(
                    f"`{name}` must be a positive multiple of the VAE factor {self.vae_scale_factor}, got {value!r}"
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise InputError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt <= 0:
            raise InputError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise InputError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}")
        if isinstance(prompt, list) and (not prompt or not all(isinstance(p, str) for p in prompt)):
            raise InputError("`prompt` must be a non-empty list of str")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InputError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        batch = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else len(prompt_embeds)
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise InputError(f"`negative_prompt` has {len(negative_prompt)} entries but the prompt batch has {batch}")
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise InputError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise InputError(
                f"`callback_on_step_end_tensor_inputs` has {sorted(unknown)}; allowed: {self._callback_tensor_inputs}"
            )
        # Before anything is allocated: a size or batch that cannot fit is one clear error, not an
        # allocator's traceback (or the out-of-memory killer) minutes later.
        images = batch * num_images_per_prompt
        check_sampling_fits(
            self.unet.config,
            self.vae.config,
            height,
            width,
            images,
            guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None,
            self.unet.dtype,
            self._execution_device,
            vae_batch=1 if getattr(self.vae, "use_slicing", False) else images,
            vae_tile=self.vae.tile_sample_min_size if getattr(self.vae, "use_tiling", False) else None,
        )

    def _tokenize(self, prompt: list[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's length; longer prompts are cut with a warning."""
        max_len = self.tokenizer.model_max_length
        ids = token_ids(self.tokenizer, prompt)
        full = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > max_len:
            removed = self.tokenizer.batch_decode(full[:, max_len - 1 : -1], skip_special_tokens=True)
            logger.warning(f"prompt cut to {max_len} tokens; dropped: {[r for r in removed if r]}")
        return ids

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states for the prompts (and the negative prompts under guidance).

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each repeated ``num_images_per_prompt``
            times; the second is ``None`` without guidance.
        """
        dtype = self.text_encoder.dtype
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self.text_encoder(self._tokenize(prompts).to(device))[0]
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        batch = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * batch if isinstance(negatives, str) else negatives
            negative_prompt_embeds = self.text_encoder(self._tokenize(negatives).to(device))[0]
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0), negative_prompt_embeds

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise, scaled by the scheduler's ``init_noise_sigma``."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise InputError(
                f"got {len(generator)} generators for an effective batch of {batch_size} images "
                "(prompts × num_images_per_prompt); pass one generator or one per image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents (in the UNet's normalised space) to images in [-1, 1]."""
        latents = latents / self.vae.config.scaling_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        # Chosen by measurement on the from-zero shapes model (benchmarks/README.md): 2.5 gave the
        # best prompt adherence (1.5-2.5 within noise of each other, 4 and above worse). Large
        # pretrained models such as Stable Diffusion are usually sampled at about 7.5.
        guidance_scale: float = 2.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images from text.

        Args:
            prompt: the prompt or prompts; or pass ``prompt_embeds``.
            height, width: image size in pixels, multiples of the VAE factor; default from the UNet.
            num_inference_steps: number of scheduler steps.
            timesteps, sigmas: custom schedules, for schedulers whose ``set_timesteps`` takes them.
            guidance_scale: classifier-free guidance weight; 1 or less turns guidance off.
            negative_prompt: what to steer away from (the unconditional branch); default "".
            num_images_per_prompt: images generated for each prompt.
            generator: a ``torch.Generator``, or one per generated image, for reproducible noise.
            latents: initial noise of shape ``(batch, C, H/f, W/f)``, instead of sampling it.
            prompt_embeds, negative_prompt_embeds: precomputed text encoder hidden states.
            output_type: "pil", "np" (float HWC in [0, 1]), "pt" (float CHW in [0, 1]) or "latent".
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            guidance_rescale: guidance rescale factor φ of Lin et al. 2024, section 3.4.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` called after each
                step; returned tensors (e.g. ``latents``) replace the pipeline's; set
                ``pipe._interrupt = True`` to stop early.
            callback_on_step_end_tensor_inputs: names of tensors passed to the callback.

        Returns:
            ``ImagePipelineOutput`` with ``images``, or ``(images,)`` when ``return_dict`` is False.
        """
        callback_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        # 0. Default size from the UNet's sample size and the VAE factor.
        height = height or self.default_size
        width = width or self.default_size

        # 1. Check inputs.
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            output_type,
            callback_inputs,
            guidance_scale,
        )
        self._interrupt = False

        # 2. Call parameters.
        device = self._execution_device
        do_cfg = guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

        # 3. Encode the prompts.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        batch_size = prompt_embeds.shape[0]
        # Unconditional first, as stock Stable Diffusion orders the guidance batch.
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds

        # 4. Timesteps.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

        # 5. Initial latents.
        latents = self.prepare_latents(batch_size, height, width, prompt_embeds.dtype, device, generator, latents)

        # 6. Stochastic schedulers (DDPM, Euler ancestral, SDE solvers) draw their noise from `generator`.
        step_params = inspect.signature(self.scheduler.step).parameters
        extra_step_kwargs = {"generator": generator} if "generator" in step_params else {}

        # 7. Denoising loop. On the CPU the UNet forward may replay a trace (`enable_unet_tracing`).
        unet_forward = self._unet_traces.runner(self.unet, enabled=self._unet_tracing)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = unet_forward(model_input, t, embeds)
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                    if guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    tensors["negative_prompt_embeds"] = negative_prompt_embeds
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
                progress_bar.update()

        # 8. Decode.
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
