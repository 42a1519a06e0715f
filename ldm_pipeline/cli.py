"""The ``ldm`` command: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .schedulers import SCHEDULERS


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt with a saved pipeline")
    p.add_argument("--model", required=True, help="pipeline folder or Hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=_positive_int, default=1)
    p.add_argument("--height", type=_positive_int, default=None, help="default: the model's size")
    p.add_argument("--width", type=_positive_int, default=None, help="default: the model's size")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    p.add_argument("--out", type=Path, required=True, help="PNG path; with several images, a grid")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .images import image_grid
    from .loading import load_pipeline
    from .schedulers import make_scheduler

    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must end in .png, got {args.out}")
    # Loading bars would bury the one line the command prints; the sampling bar stays.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = load_pipeline(args.model)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(args.out)
        print(f"wrote {args.out}")
        return
    for i, image in enumerate(images):
        image.save(args.out.with_name(f"{args.out.stem}-{i}.png"))
    image_grid(images).save(args.out)
    print(f"wrote a grid of {len(images)} images to {args.out} and each as {args.out.stem}-N.png beside it")


def build_parser() -> argparse.ArgumentParser:
    """The ``ldm`` argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(prog="ldm", description="latent diffusion text-to-image")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ldm`` command; expected failures print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
