"""Will a sampling call fit in memory? An estimate made before anything is allocated.

Sampling memory beyond the weights grows with the largest activation: the VAE decoder's at full
resolution (its widest up-block at the output size) or the UNet's at the latent size (the
feed-forward of its attention levels; twice the batch under classifier-free guidance). Measured
peaks of resident memory added by a call (CPU, fp32, `benchmarks/sampling_memory.py`) were 3.8 to
9.8 times that largest tensor, for the `shapes` and `sd15` presets from 256² to 1,024², batches of
1-4, with and without VAE slicing and tiling: a request is refused when even 3 times it cannot
fit in the memory that is free, so nothing that fits is refused.
"""

from __future__ import annotations

import math

import psutil
import torch

from .errors import InputError

# Peak sampling memory over the largest activation, measured: 3.7-7 (see the module docstring).
LOW_FACTOR = 3


def largest_activation(
    unet_config,
    vae_config,
    height: int,
    width: int,
    batch: int,
    guided: bool,
    vae_batch: int | None = None,
    vae_tile: int | None = None,
) -> int:
    """Elements in the largest tensor a sampling call makes: UNet (latent size) or VAE decoder (output size).

    Args:
        vae_batch: images the VAE decodes at once (1 with VAE slicing; default ``batch``).
        vae_tile: the side of the VAE's decoding tiles with VAE tiling on (None: off).
    """
    vae_channels = list(vae_config["block_out_channels"])
    factor = 2 ** (len(vae_channels) - 1)
    h, w = height // factor, width // factor
    # In a level with attention the widest tensor is the feed-forward's GEGLU projection, 8 × the
    # channels (2 × an inner width of 4 ×); attention itself runs in O(tokens) memory (SDPA).
    channels = unet_config["block_out_channels"]
    kinds = unet_config.get("down_block_types") or ["CrossAttnDownBlock2D"] * len(channels)
    widest = max(
        c * (8 if "Attn" in kind else 1) * math.ceil(h / 2**i) * math.ceil(w / 2**i)
        for i, (c, kind) in enumerate(zip(channels, kinds, strict=True))
    )
    unet = widest * batch * (2 if guided else 1)
    if vae_tile is not None:  # tiles of at most vae_tile² pixels, blended into the full RGB output
        h, w = min(h, vae_tile // factor), min(w, vae_tile // factor)
    # The decoder's up-blocks run from the widest channels at the latent size to the narrowest at
    # the output size; a block's input and output both live at its resolution.
    widths = vae_channels[::-1]
    vae = max(max(widths[k - 1] if k else widths[0], widths[k]) * (h * 2**k) * (w * 2**k) for k in range(len(widths)))
    images = batch if vae_batch is None else vae_batch
    return max(unet, vae * images, 3 * height * width * batch)


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` (the accelerator's, else the machine's available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "xpu" and hasattr(torch.xpu, "mem_get_info"):
        return torch.xpu.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_sampling_fits(
    unet_config,
    vae_config,
    height: int,
    width: int,
    batch: int,
    guided: bool,
    dtype: torch.dtype,
    device: torch.device | str,
    vae_batch: int | None = None,
    vae_tile: int | None = None,
) -> None:
    """Raise ``ValueError`` when a call at ``height`` × ``width`` for ``batch`` images cannot fit.

    The message gives the estimate, the memory free, and the batch or the square size that fit.
    """
    element = torch.finfo(dtype).bits // 8
    device = torch.device(device)
    need = (
        element
        * LOW_FACTOR
        * largest_activation(unet_config, vae_config, height, width, batch, guided, vae_batch, vae_tile)
    )
    free = free_bytes(device)
    if need <= free:
        return
    one = largest_activation(unet_config, vae_config, height, width, 1, guided, 1, vae_tile)
    per_image = element * LOW_FACTOR * one
    fits_batch = free // per_image
    # The largest activation grows with the area: scale the side by the square root of the ratio.
    step = 2 ** (len(vae_config["block_out_channels"]) - 1) * 8
    side = int(math.sqrt(height * width * free / per_image) // step * step)
    what = f"{batch} images at {width}x{height} need" if batch > 1 else f"an image of {width}x{height} needs"
    hint = (
        f"{fits_batch} image{'s' if fits_batch > 1 else ''} at a time fit at this size"
        if fits_batch
        else f"at most about {side}x{side} fits"
    )
    raise InputError(
        f"{what} at least {need / 2**30:,.1f} GiB of memory to sample and {free / 2**30:,.1f} GiB "
        f"are free on {device.type}: {hint}"
    )
