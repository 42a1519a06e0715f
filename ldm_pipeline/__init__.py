"""ldm-pipeline: latent diffusion text-to-image on Hugging Face diffusers."""

from . import _quiet  # noqa: F401  (first: it filters a notice raised while diffusers imports)
from .pipeline import LatentDiffusionPipeline
from .presets import PRESETS, ModelPreset, build_pipeline, get_preset
from .tokenizer import load_clip_tokenizer

__all__ = [
    "PRESETS",
    "LatentDiffusionPipeline",
    "ModelPreset",
    "build_pipeline",
    "get_preset",
    "load_clip_tokenizer",
]
__version__ = "0.1.0"
