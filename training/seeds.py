"""The run's random streams, one table: each draws from ``cfg.seed`` plus its own offset, so that
no two streams share a seed and a stage draws the same numbers whether or not the stages before it
ran in this process (resume)."""

from __future__ import annotations

# A run's seeds (``seed``, ``data.seed``): accelerate's set_seed seeds numpy, which takes 32 bits.
MAX_SEED = 2**32 - 1

# Offsets from the run's seed.
OFFSETS = {
    # accelerate's set_seed at the start of each stage: its models' initial weights and anything
    # drawn from the global generators (dropout, the VAE's posterior samples).
    "vae.start": 0,
    "clip.start": 1,
    "unet.start": 2,
    # The order of the training batches (training/data.py BatchSampler).
    "vae.batches": 6,
    "clip.batches": 7,
    "unet.batches": 8,
    # The UNet's noise and timesteps, drawn for a micro-batch over all processes alike.
    "unet.noise": 3,
    # The VAE's random crops; the caption drawn for each image when it has several.
    "vae.crops": 4,
    "clip.captions": 5,
    # DreamBooth: the order of the class-image batches; class image i is drawn from this + 1000 + i.
    "unet.class_batches": 9,
    "dreambooth.class_images": 1000,
}


def seed_of(run_seed: int, stream: str) -> int:
    """The seed of one stream of a run (``OFFSETS``' keys), wrapped into 0..``MAX_SEED`` (so that the
    largest run seeds work too; streams stay distinct)."""
    return (run_seed + OFFSETS[stream]) % (MAX_SEED + 1)
