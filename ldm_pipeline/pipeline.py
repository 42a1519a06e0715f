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
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, deprecate, logging, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .errors import InputError
from .memory import check_sampling_fits
from .tokenizer import token_ids
from .tracing import UNetTraces

# Under diffusers' logger tree, so that `diffusers.utils.logging.set_verbosity_*` reaches our warnings.
logger = logging.get_logger(f"diffusers.{__name__}")

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


def _normalised_scheduler(scheduler):
    """An old scheduler config brought up to date as stock Stable Diffusion does on load
    (``steps_offset`` 1, ``clip_sample`` off, each with diffusers' deprecation warning), so that an
    old checkpoint samples the same timesteps in both pipelines."""
    for key, value, old in (("steps_offset", 1, lambda v: v != 1), ("clip_sample", False, lambda v: v is True)):
        current = getattr(scheduler.config, key, value) if scheduler is not None else value
        if old(current):
            message = (
                f"The scheduler config sets `{key}` to {current}; it is treated as {value}, as "
                "StableDiffusionPipeline does. Update the folder's scheduler_config.json."
            )
            deprecate(f"{key} not {value}", "1.0.0", message, standard_warn=False)
            scheduler._internal_dict = FrozenDict({**scheduler.config, key: value})
    return scheduler


class LatentDiffusionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    """Text-to-image latent diffusion: CLIP text encoder, conditional UNet, scheduler, VAE.

    The loading mixins are stock Stable Diffusion's: LoRA (``load_lora_weights``, ``fuse_lora``,
    ``set_adapters``), textual inversion (``load_textual_inversion``), IP-Adapter
    (``load_ip_adapter``, with ``image_encoder`` and ``feature_extractor``), ``from_single_file``.

    Args:
        vae: decodes latents to images; its ``scaling_factor`` config entry normalises latents.
        text_encoder: CLIP text tower whose last hidden state conditions the UNet.
        tokenizer: CLIP tokenizer; ``model_max_length`` sets the prompt length.
        unet: predicts noise (or v, per the scheduler's ``prediction_type``) from noised latents.
        scheduler: any diffusers scheduler of the Karras family (DDIM, DPM-Solver++, Euler, ...).
        image_encoder, feature_extractor: optional, for IP-Adapter image prompts.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # Stock Stable Diffusion's IP-Adapter helpers, used as they are (they read self.image_encoder,
    # self.feature_extractor and the UNet's image projection layers).
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_normalised_scheduler(scheduler),
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        # A pipeline may hold only its text parts (e.g. to cache prompt embeddings with encode_prompt);
        # stock assumes its VAE's factor of 8 then.
        vae_depth = len(self.vae.config.block_out_channels) if getattr(self, "vae", None) is not None else 4
        self.vae_scale_factor = 2 ** (vae_depth - 1)
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

    # What a step-end callback may read (and, through the private attribute, change), as in
    # stock Stable Diffusion; e.g. ``pipe._guidance_scale = 1.0`` turns guidance off from then on.
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

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
        index["safety_checker"] = [None, None]
        index.setdefault("feature_extractor", [None, None])
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
        custom_schedule: bool = False,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
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
        if not (num_inference_steps is None and custom_schedule) and (
            not isinstance(num_inference_steps, int) or num_inference_steps <= 0
        ):
            raise InputError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise InputError("pass at most one of `ip_adapter_image` and `ip_adapter_image_embeds`")
        if ip_adapter_image_embeds is not None and (
            not isinstance(ip_adapter_image_embeds, list) or any(e.ndim not in (3, 4) for e in ip_adapter_image_embeds)
        ):
            raise InputError("`ip_adapter_image_embeds` must be a list of 3D or 4D tensors, one per IP-Adapter")
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

    def _encode_text(self, prompts: list[str], device: torch.device, clip_skip: int | None) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "this pipeline has no text encoder or tokenizer: pass prompt_embeds (and negative_prompt_embeds "
                "when guidance_scale > 1) instead of prompts"
            )
        prompts = self.maybe_convert_prompt(prompts, self.tokenizer)  # textual inversion's multi-vector tokens
        ids = self._tokenize(prompts).to(device)
        if clip_skip is None:
            return self.text_encoder(ids)[0]
        # The layer clip_skip layers before the last, through the final layer norm (as stock).
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(hidden)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states for the prompts (and the negative prompts under guidance),
        with stock ``StableDiffusionPipeline.encode_prompt``'s arguments and results.

        Args:
            lora_scale: the strength of the text encoder's loaded LoRA layers for this encoding.
            clip_skip: use the hidden state this many layers before the last (then the final
                layer norm), as some fine-tunes are trained to.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each repeated ``num_images_per_prompt``
            times; the second is ``None`` without guidance.
        """
        if lora_scale is not None:
            self._lora_scale = lora_scale
            if USE_PEFT_BACKEND and self.text_encoder is not None:
                scale_lora_layers(self.text_encoder, lora_scale)
        try:
            # As stock: a pipeline without its text encoder (given prompt_embeds) keeps the UNet's dtype.
            parts = [part for part in (self.text_encoder, self.unet) if part is not None]
            dtype = parts[0].dtype if parts else prompt_embeds.dtype
            if prompt_embeds is None:
                prompt_embeds = self._encode_text([prompt] if isinstance(prompt, str) else prompt, device, clip_skip)
            prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
            batch = prompt_embeds.shape[0]
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * batch if isinstance(negatives, str) else negatives
                # Without clip_skip, as stock: the unconditional branch is the last layer's output.
                negative_prompt_embeds = self._encode_text(negatives, device, None)
        finally:
            if lora_scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

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

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """The scheduler step's ``eta`` (DDIM's η, Song et al. 2021; ignored by other schedulers)
        and ``generator`` (stochastic schedulers: DDPM, Euler ancestral, SDE solvers), where it takes them."""
        params = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        # Chosen by measurement on the from-zero shapes model (benchmarks/README.md): 2.5 gave the
        # best prompt adherence (1.5-2.5 within noise of each other, 4 and above worse). Large
        # pretrained models such as Stable Diffusion are usually sampled at about 7.5.
        guidance_scale: float = 2.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images from text. The arguments are stock ``StableDiffusionPipeline``'s.

        Args:
            prompt: the prompt or prompts; or pass ``prompt_embeds``.
            height, width: image size in pixels, multiples of the VAE factor; default from the UNet.
            num_inference_steps: number of scheduler steps (None with ``timesteps`` or ``sigmas``).
            timesteps, sigmas: custom schedules (e.g. Align Your Steps), for schedulers whose
                ``set_timesteps`` takes them.
            guidance_scale: classifier-free guidance weight; 1 or less turns guidance off. A UNet
                with ``time_cond_proj_dim`` (LCM-distilled) gets it as ``timestep_cond`` instead.
            negative_prompt: what to steer away from (the unconditional branch); default "".
            num_images_per_prompt: images generated for each prompt.
            eta: DDIM's η (0: deterministic); other schedulers ignore it.
            generator: a ``torch.Generator``, or one per generated image, for reproducible noise.
            latents: initial noise of shape ``(batch, C, H/f, W/f)``, instead of sampling it.
            prompt_embeds, negative_prompt_embeds: precomputed text encoder hidden states.
            ip_adapter_image, ip_adapter_image_embeds: image prompts for loaded IP-Adapters.
            output_type: "pil", "np" (float HWC in [0, 1]), "pt" (float CHW in [0, 1]) or "latent".
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            cross_attention_kwargs: passed to the attention processors; ``{"scale": s}`` sets the
                strength of loaded LoRAs for this call.
            guidance_rescale: guidance rescale factor φ of Lin et al. 2024, section 3.4.
            clip_skip: condition on the text encoder's layer this many before the last.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` (or a diffusers
                ``PipelineCallback``) called after each step; returned tensors replace the
                pipeline's. ``prompt_embeds`` is the guidance batch (unconditional first), as in
                stock; set ``pipe._interrupt = True`` to stop, ``pipe._guidance_scale`` to change
                the guidance from then on.
            callback_on_step_end_tensor_inputs: names of tensors passed to the callback.

        Returns:
            ``ImagePipelineOutput`` with ``images``, or ``(images,)`` when ``return_dict`` is False.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
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
            custom_schedule=timesteps is not None or sigmas is not None,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Call parameters.
        device = self._execution_device

        # 3. Encode the prompts; unconditional first in the guidance batch, as stock orders it.
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        batch_size = prompt_embeds.shape[0]
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        added_cond_kwargs = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch_size, self.do_classifier_free_guidance
            )
            added_cond_kwargs = {"image_embeds": image_embeds}

        # 4. Timesteps.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)

        # 5. Initial latents.
        latents = self.prepare_latents(batch_size, height, width, prompt_embeds.dtype, device, generator, latents)

        # 6. Scheduler step arguments; the guidance embedding of an LCM-distilled UNet.
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch_size)
            timestep_cond = self.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. Denoising loop. On the CPU the UNet forward may replay a trace (`enable_unet_tracing`),
        # which takes the sample, timestep, text and guidance embedding; a call with other per-call
        # UNet settings (attention kwargs, image prompts) runs it eagerly.
        plain = cross_attention_kwargs is None and added_cond_kwargs is None
        unet_forward = self._unet_traces.runner(self.unet, enabled=self._unet_tracing and plain)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                if plain:
                    noise_pred = unet_forward(model_input, t, prompt_embeds, timestep_cond)
                else:
                    noise_pred = self.unet(
                        model_input,
                        t,
                        encoder_hidden_states=prompt_embeds,
                        timestep_cond=timestep_cond,
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        added_cond_kwargs=added_cond_kwargs,
                        return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                    if self.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=self.guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
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
