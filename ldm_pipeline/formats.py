"""Files other tools load: one Stable Diffusion checkpoint file, and LoRAs in kohya-ss' key layout.

**Single file** (`single_file_state_dict`): the key layout of the original Stable Diffusion
checkpoints (CompVis' ``ldm`` code, which AUTOMATIC1111 and ComfyUI load, and diffusers'
``from_single_file`` converts): the UNet under ``model.diffusion_model.`` with ``input_blocks`` /
``middle_block`` / ``output_blocks`` numbered as ldm's ``UNetModel`` builds them, the VAE under
``first_stage_model.`` (``encoder.down.N.block.M``, the decoder's levels in reverse order, mid-block
attention as 1×1 convolutions), the CLIP text model under ``cond_stage_model.transformer.``. This
is the inverse of the mapping diffusers applies in ``loaders/single_file_utils.py``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``),
written for any number of levels and ``layers_per_block``, so that our small models and SD 1.x
alike round-trip. Stock diffusers loads it with
``StableDiffusionPipeline.from_single_file(path, config=<pipeline folder>)`` (the folder gives
the configs a small model's keys cannot be guessed from).

**kohya** (`kohya_lora_state_dict`): kohya-ss' sd-scripts names each adapted module
``lora_unet_<diffusers module path with "." → "_">`` (SD 1.x UNets are trained on diffusers'
module names) or ``lora_te_text_model_<path>``, with ``.lora_down.weight`` (A), ``.lora_up.weight``
(B) and a scalar ``.alpha`` (scale alpha / rank). AUTOMATIC1111's and ComfyUI's LoRA loaders read
this layout, and diffusers' ``load_lora_weights`` converts it
(``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError
from .files import write_atomically

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _rename(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in ldm's ``UNetModel`` key layout."""
    per = config["layers_per_block"]
    levels = len(config["down_block_types"])
    has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    out = {}
    for key, value in state.items():
        for new, old in fixed.items():
            if key.startswith(new + "."):
                rest = key[len(new) + 1 :]
                out[old + "." + (_rename(rest, _RESNET) if "resnets" in new else rest)] = value
                break
        else:
            out[_unet_block_key(key, per, levels, has_attention)] = value
    return out


def _unet_block_key(key: str, per: int, levels: int, has_attention: list[bool]) -> str:
    found = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if not found:
        raise InputError(f"no original Stable Diffusion key for the UNet's {key!r} (an unsupported block?)")
    side, block, kind, index, rest = found.groups()
    block, index = int(block), int(index)
    if side == "down":
        position = 1 + block * (per + 1) + (per if kind == "downsamplers" else index)
        if kind == "downsamplers":
            return f"input_blocks.{position}.0.op.{rest.removeprefix('conv.')}"
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{position}.{slot}.{_rename(rest, _RESNET) if slot == 0 else rest}"
    # A level's per + 1 output blocks; its upsampler sits in the last one, after the resnet (and
    # the attention, where the level has one).
    position = block * (per + 1) + (per if kind == "upsamplers" else index)
    if kind == "upsamplers":
        slot = 2 if has_attention[block] else 1
        return f"output_blocks.{position}.{slot}.conv.{rest.removeprefix('conv.')}"
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{position}.{slot}.{_rename(rest, _RESNET) if slot == 0 else rest}"


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in ldm's ``AutoencoderKL`` key layout."""
    levels = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        rest = rest.replace("conv_norm_out", "norm_out")
        found = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
        if found:
            side, block, kind, index, tail = found.groups()
            level = int(block) if side == "down" else levels - 1 - int(block)
            if kind == "resnets":
                rest = f"{side}.{level}.block.{index}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                rest = f"{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
        elif mid and mid.group(1) == "resnets":
            rest = f"mid.block_{int(mid.group(2)) + 1}.{mid.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif mid:
            rest = "mid.attn_1." + _rename(mid.group(3), _VAE_ATTENTION)
            if value.ndim == 2:  # ldm's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[f"{part}.{rest}"] = value
    return out


def text_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict with the ``text_model.`` names SD checkpoints use."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def single_file_state_dict(pipe, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one original-layout Stable Diffusion state dict."""
    parts = (
        (UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)),
        (VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)),
        (TEXT_PREFIX, text_to_ldm(pipe.text_encoder.state_dict())),
    )
    return {prefix + k: v.detach().to(dtype).contiguous() for prefix, part in parts for k, v in part.items()}


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Save to a temporary name and rename into place: no half-written file under ``path``."""
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_single_file(model: str | Path, path: str | Path, dtype: str = "fp32") -> Path:
    """Write the pipeline folder ``model`` as one ``.safetensors`` Stable Diffusion checkpoint.

    Raises:
        InputError: ``path`` does not end in ``.safetensors``, or an unknown ``dtype``.
    """
    from .pipeline import LatentDiffusionPipeline

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"--output {path}: a single-file checkpoint is written as .safetensors")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: use one of {list(DTYPES)}")
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    return _write(single_file_state_dict(pipe, DTYPES[dtype]), path, {"format": "pt", "source": str(model)})


_LORA_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_(A|B)\.weight$")


def _alphas(metadata: dict[str, str] | None) -> dict[str, dict]:
    """Each part's peft settings (lora_alpha, r, alpha_pattern) from a diffusers LoRA file's metadata."""
    raw = json.loads((metadata or {}).get("lora_adapter_metadata", "{}"))
    parts: dict[str, dict] = {}
    for key, value in raw.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = value
    return parts


def kohya_lora_state_dict(lora_file: str | Path) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA file (``pytorch_lora_weights.safetensors``) in kohya-ss' layout.

    Raises:
        InputError: the file holds keys that are not plain LoRA (DoRA magnitudes, LoHa/LoKr,
            biases): kohya's layout for those differs by tool, so they are refused, not dropped.
    """
    with safe_open(str(lora_file), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    settings = _alphas(metadata)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        found = _LORA_KEY.match(key) or _PEFT_KEY.match(key)
        if not found:
            raise InputError(f"{lora_file}: {key!r} is not a plain LoRA weight; the kohya layout takes only LoRA A/B")
        part, module, which = found.groups()
        if part == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{'down' if which in ('down', 'A') else 'up'}.weight"] = value.contiguous()
        if which in ("down", "A"):
            peft = settings.get(part, {})
            rank = value.shape[0]
            pattern = peft.get("alpha_pattern") or {}
            alpha = next((a for p, a in pattern.items() if module.endswith(p)), peft.get("lora_alpha", rank))
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya_lora(lora: str | Path, path: str | Path) -> Path:
    """Write the LoRA folder (or file) ``lora`` as one kohya-layout ``.safetensors`` file.

    Raises:
        InputError: not a LoRA folder or file, or an output that is not ``.safetensors``.
    """
    lora, path = Path(lora), Path(path)
    source = lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora
    if not source.is_file():
        raise InputError(f"{lora}: no pytorch_lora_weights.safetensors (a LoRA folder written by ldm train)")
    if path.suffix != ".safetensors":
        raise InputError(f"--output {path}: a kohya LoRA is written as .safetensors")
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    return _write(kohya_lora_state_dict(source), path, metadata)
