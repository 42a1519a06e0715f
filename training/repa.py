"""Representation alignment of the UNet's features with a frozen image encoder's.

REPA (Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion Transformers
Is Easier Than You Think", arXiv 2410.06940): a small MLP projects an intermediate feature map
of the denoiser, computed from the noisy input, onto a frozen encoder's patch features of the
clean image; minus their mean cosine similarity, times a weight, is added to the denoising
loss. U-REPA (arXiv 2503.18414) carries it to UNets: align the middle stage and upsample the
projected features to the encoder's patch grid.

The encoder here is a CLIP image tower: by default the one the run's own ``clip`` stage just
trained on the same images (``<output>/clip``), so no outside weights are needed; a CLIP model
folder or Hub id otherwise. Its patch features are computed once per image (and per flipped
image with ``data.random_flip``) and kept in memory beside the cached latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from ldm_pipeline.errors import InputError
from ldm_pipeline.evaluation.metrics import clip_pixel_values
from ldm_pipeline.loading import load_component

# The UNet modules whose outputs can be aligned: a down or up block's, or the middle block's.
BLOCK_PATTERN = r"(down_blocks|up_blocks)\.\d+|mid_block"


def load_encoder(source: str, allow_pickle: bool = False) -> torch.nn.Module:
    """The image tower of the CLIP model in ``source`` (a run folder's ``clip``, a CLIP model
    folder or Hub id), frozen and in eval mode; its ``config`` is the vision config."""
    clip = load_component(CLIPModel, source, "clip", allow_pickle)
    return clip.vision_model.requires_grad_(False).eval()


@torch.no_grad()
def patch_features(encoder: torch.nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The encoder's patch tokens of images in [-1, 1] (``[N, 3, H, W]``, resized to its input
    size), from hidden state ``layer``, without the class token: ``[N, patches, width]``."""
    side = encoder.config.image_size
    if images.shape[-2:] != (side, side):
        images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
    param = next(encoder.parameters())
    pixels = clip_pixel_values(images).to(param.device, param.dtype)
    hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:].float()


def cached_features(encoder: torch.nn.Module, bucket, layer: int, flip: bool, batch_size: int = 256) -> dict:
    """A bucket's (`training.data.Pixels`) patch features on the CPU, ``features`` and with
    ``flip`` ``features_flipped`` (of the mirrored images, as the flipped latents are)."""
    out: dict[str, list[torch.Tensor]] = {"features": [], "features_flipped": []}
    for start in range(0, len(bucket), batch_size):
        images = bucket.float_batch(torch.arange(start, min(start + batch_size, len(bucket))))
        out["features"].append(patch_features(encoder, images, layer).cpu())
        if flip:
            out["features_flipped"].append(patch_features(encoder, images.flip(-1), layer).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


class Projector(torch.nn.Module):
    """REPA's projector: an MLP (1×1 convolutions with SiLU) from the UNet's feature channels to
    the encoder's width, its output resized to the encoder's patch grid (U-REPA: upsample after
    the MLP) and flattened to ``[N, patches, width]``."""

    def __init__(self, channels: int, width: int, hidden: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, hidden, 1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, width, 1),
        )

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.mlp(features)
        if x.shape[-2:] != grid:
            x = F.interpolate(x, size=grid, mode="bilinear")
        return x.flatten(2).transpose(1, 2)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, minus the mean over patches of the cosine similarity of the projected UNet
    features and the encoder's (both ``[N, patches, width]``): REPA's loss, in [-1, 1]."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(dim=1)


class FeatureTap:
    """Keeps the latest output of one module of the UNet (a forward hook): the features the
    projector aligns. A block's tuple output gives its hidden states, its first element."""

    def __init__(self, unet: torch.nn.Module, block: str):
        try:
            module = unet.get_submodule(block)
        except AttributeError as err:
            raise InputError(f"unet.repa.block: this UNet has no module {block!r}") from err
        self.features: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.features = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("the aligned UNet block did not run in this forward pass")
        return features


def square_grid(patches: int) -> tuple[int, int]:
    """The encoder's patch grid: square, as its input is (each image is resized to it)."""
    side = round(patches**0.5)
    if side * side != patches:
        raise InputError(f"unet.repa: the encoder's {patches} patch tokens are not a square grid")
    return side, side
