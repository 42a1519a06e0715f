"""A tiny three-stage run that SIGKILLs itself at a chosen point, for the resume tests.

    python killable_run.py OUT [--resume latest] [--kill-at-step N | --kill-in-write N]

``--kill-at-step N`` dies inside the N-th optimiser step of the whole run (after the backward
pass, before the update); ``--kill-in-write N`` dies while writing the N-th checkpoint, after its
tensors are on disk and before it is marked complete.
"""

import argparse
import os
import signal

import ldm_pipeline.training.checkpoint as checkpoint
import torch
from ldm_pipeline.training.quickstart import quickstart_config
from ldm_pipeline.training.run import train

OVERRIDES = [
    "report_to=none",
    "mixed_precision=no",  # the same numbers on every CPU
    "data.random_flip=true",
    "vae.steps=6",
    "vae.gan_start_step=2",
    "clip.steps=5",
    "unet.steps=7",
    "unet.gradient_accumulation_steps=2",
    "vae.checkpoint_every=2",
    "clip.checkpoint_every=2",
    "unet.checkpoint_every=2",
    "unet.checkpoint_keep=2",
    # The CUDA default, and the harder case for restoring optimiser moments (their layout).
    "unet.memory_format=channels_last",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--kill-in-write", type=int, default=None)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    calls = {"step": 0, "write": 0}
    if args.kill_at_step is not None:
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls["step"] += 1
            if calls["step"] == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = step
    if args.kill_in_write is not None:
        real_save = checkpoint.save_file

        def save_file(tensors, path):
            real_save(tensors, path)
            calls["write"] += 1
            if calls["write"] == args.kill_in_write:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_file = save_file
    train(quickstart_config(smoke=True, overrides=OVERRIDES), args.out, resume=args.resume)


if __name__ == "__main__":
    main()
