"""The ``ldm`` command: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError, UsageError, out_of_memory, user_os_error
from .schedulers import SCHEDULERS

# torch generators take 64-bit seeds; image N of a run uses seed + N, kept in range.
MAX_SEED = 2**63 - 1
# ``ldm generate`` writes a grid of the images up to this many; beyond, the image files only.
GRID_LIMIT = 100


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, got {text}")
    return value


def _aspect(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 1.0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1 (longer side / shorter side), got {text}")
    return value


def _sampling_kwargs(args: argparse.Namespace, pipe) -> dict:
    """``--steps`` and ``--guidance`` as pipeline arguments; those not given are the pipeline's
    (an LCM scheduler's: `sampling_defaults`)."""
    from .schedulers import sampling_defaults

    given = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    return {**sampling_defaults(pipe), **{k: v for k, v in given.items() if v is not None}}


def _sampling_pipeline(args: argparse.Namespace):
    """``--model`` loaded for sampling, with ``--lora`` on top and ``--scheduler`` in place when given."""
    from .loading import load_lora, load_pipeline
    from .schedulers import make_scheduler

    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    if args.lora is not None:
        load_lora(pipe, args.lora)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    return pipe


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt with a saved pipeline")
    p.add_argument("--model", required=True, help="pipeline folder or Hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=_positive_int, default=None, help="default: the pipeline's (20; lcm: 4)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default: the pipeline's (2.5; lcm with a LoRA: 1, no guidance batch)",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--num-images", type=_positive_int, default=1, help="image N uses the seed --seed + N")
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images sampled at once, each written as it is done"
    )
    p.add_argument("--height", type=_positive_int, default=None, help="default: the model's size")
    p.add_argument("--width", type=_positive_int, default=None, help="default: the model's size")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    p.add_argument("--out", type=Path, required=True, help="PNG path; with several images, a grid")
    p.add_argument("--lora", type=Path, default=None, help="a LoRA folder to load on top (pipe.load_lora_weights)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="also load pickle (.bin) weights: only if you trust them"
    )
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from .images import image_grid

    if args.out.suffix.lower() != ".png":
        raise InputError(f"--out must end in .png, got {args.out}")
    # Loading bars would bury the one line the command prints; the sampling bar stays.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = _sampling_pipeline(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    count, batch = args.num_images, min(args.batch_size, args.num_images)
    kept = []  # for the grid; beyond GRID_LIMIT images only the files are written
    overall = None
    if count > batch:  # one bar over the images instead of one per batch
        pipe.set_progress_bar_config(disable=True)
        overall = tqdm(total=count, unit="image", desc="generate")
    for start in range(0, count, batch):
        seeds = range(args.seed + start, args.seed + min(start + batch, count))
        images = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            **_sampling_kwargs(args, pipe),
            num_images_per_prompt=len(seeds),
            height=args.height,
            width=args.width,
            # One generator per image: image N is the same in any batch (`--seed S+N --num-images 1`).
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        ).images
        if count == 1:
            images[0].save(args.out)
            print(f"wrote {args.out}")
            return
        for i, image in enumerate(images, start):
            image.save(args.out.with_name(f"{args.out.stem}-{i}.png"))
        if count <= GRID_LIMIT:
            kept.extend(images)
        if overall is not None:
            overall.update(len(images))
    if overall is not None:
        overall.close()
    if count > GRID_LIMIT:
        print(f"wrote {count} images as {args.out.stem}-N.png in {args.out.parent} (no grid beyond {GRID_LIMIT})")
        return
    image_grid(kept).save(args.out)
    print(f"wrote a grid of {count} images to {args.out} and each as {args.out.stem}-N.png beside it")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the stages a YAML config names (vae, clip, unet)")
    p.add_argument("config", type=Path, help="YAML run config, or the name of a shipped one (shapes, emoji, ...)")
    p.add_argument("--output", type=Path, default=Path("runs/train"), help="run folder (default runs/train)")
    p.add_argument("--stage", action="append", choices=["vae", "clip", "unet"], help="run only this stage")
    p.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue the run in --output from its newest complete checkpoint, or from a checkpoint folder",
    )
    p.add_argument("--force-resume", action="store_true", help="resume even if the config changes the maths")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, the data, the models' sizes and each stage's plan; train nothing",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. unet.steps=500")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from ldm_pipeline.training.config import load_config
    from ldm_pipeline.training.run import quality_summary, train

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from ldm_pipeline.training.plan import describe

        print("\n".join(describe(cfg, args.stage)))
        return
    report = train(cfg, args.output, args.stage, resume=args.resume, force_resume=args.force_resume)
    print(f"run folder: {args.output}")
    if "lora" in report.get("unet", {}):
        print(f"lora:     {report['unet']['lora']} (ldm generate --lora, or pipe.load_lora_weights)")
    elif (args.output / "pipeline").is_dir() and "unet" in report:
        print(f"pipeline: {args.output / 'pipeline'}")
    # With overrides, the command that continues a stage names the run's resolved config.yaml,
    # which holds them (the recipe alone would drop them).
    for line in quality_summary(report, cfg, args.output, None if args.overrides else args.config):
        print(line)


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="train a shapes model from zero on this machine, then sample and evaluate")
    p.add_argument("--output", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: checks the machinery in seconds")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. unet.steps=500")
    p.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> None:
    from ldm_pipeline.training.quickstart import quickstart

    metrics = quickstart(args.output, smoke=args.smoke, overrides=args.overrides)
    pipeline = args.output / "pipeline"
    print(f"\ntrained in {metrics['train_minutes']:.1f} min (total {metrics['total_minutes']:.1f} min)")
    print(
        f"adherence on {metrics['num_samples']} shapes prompts: all correct {metrics['all_correct']:.1%} "
        f"(colour {metrics['color_accuracy']:.1%}, shape {metrics['shape_accuracy']:.1%}, "
        f"background {metrics['background_accuracy']:.1%}); VAE PSNR {metrics['psnr']:.1f} dB"
    )
    print(f"pipeline: {pipeline}\ngrid:     {args.output / 'grid.png'}\nreport:   {args.output / 'eval.json'}")
    print(f'try it:   ldm generate --model {pipeline} --prompt "a red circle on a white background" --out circle.png')
    for line in metrics["quality_summary"]:
        print(line)
    if any(isinstance(entry, dict) and entry.get("target_reached") is False for entry in metrics["stages"].values()):
        print(
            "The model did not reach the quick start's bar on this machine in the time allowed; the lines above "
            f"continue it, then score it again: ldm eval --model {pipeline} --out {args.output / 'eval.json'}"
        )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a pipeline on shapes, digits or emoji prompts")
    p.add_argument("--model", required=True, help="pipeline folder or Hub id")
    p.add_argument("--dataset", choices=["shapes", "digits", "emoji"], default="shapes")
    p.add_argument("--num-samples", type=_positive_int, default=200)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--steps", type=_positive_int, default=None, help="default: the pipeline's (lcm: 4)")
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's (lcm with a LoRA: 1)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    p.add_argument("--lora", type=Path, default=None, help="a LoRA folder to load on top (pipe.load_lora_weights)")
    p.add_argument("--clip", default=None, help="CLIP evaluator folder (default: the run's clip/ beside the model)")
    p.add_argument("--out", type=Path, required=True, help="report JSON path")
    p.add_argument(
        "--allow-pickle", action="store_true", help="also load pickle (.bin) weights: only if you trust them"
    )
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> None:
    import json

    from .evaluation import evaluate

    pipe = _sampling_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    clip_dir = args.clip
    beside = Path(args.model).parent / "clip"
    if clip_dir is None and (beside / "config.json").is_file():
        clip_dir = beside
    metrics, _ = evaluate(pipe, args.dataset, args.num_samples, args.seed, clip_dir, **_sampling_kwargs(args, pipe))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.out}")


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="serve a web page to try a pipeline (Gradio)")
    p.add_argument("--model", required=True, help="pipeline folder or Hub id")
    p.add_argument("--port", type=_positive_int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="default: this machine only; 0.0.0.0 to serve the network")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first request, faster after)")
    p.add_argument("--lora", type=Path, default=None, help="a LoRA folder to load on top (pipe.load_lora_weights)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="the page's default scheduler")
    p.add_argument(
        "--allow-pickle", action="store_true", help="also load pickle (.bin) weights: only if you trust them"
    )
    p.set_defaults(func=_app)


def _app(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise InputError('the app needs Gradio: pip install "ldm-pipeline[app]"') from err
    from .app import build_app

    pipe = _sampling_pipeline(args)
    if args.compile:
        pipe.unet.compile()
    build_app(pipe, title=f"ldm-pipeline: {args.model}").queue().launch(server_name=args.host, server_port=args.port)


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a pipeline or LoRA folder to the Hugging Face Hub with a model card")
    p.add_argument("--model", type=Path, required=True, help="pipeline folder (or LoRA folder) to upload")
    p.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="default: HF_TOKEN or the token `hf auth login` stored")
    p.add_argument("--license", default=None, help="default: apache-2.0; cc-by-sa-4.0 for a model trained on emoji")
    p.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> None:
    from .hub import push

    url = push(args.model, args.repo_id, private=args.private, token=args.token, license=args.license)
    print(f"pushed {args.model} to {args.repo_id}: {url}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a pipeline (or LoRA) folder from a UNet training checkpoint, or files other tools load",
        description="--checkpoint: the pipeline (or LoRA) folder a finished run would write. "
        "--format single-file --model FOLDER: one original-layout Stable Diffusion .safetensors "
        "(AUTOMATIC1111, ComfyUI, diffusers' from_single_file). --format kohya --lora FOLDER: the LoRA "
        "in kohya-ss' key layout (AUTOMATIC1111, ComfyUI, diffusers' load_lora_weights).",
    )
    p.add_argument("--format", choices=["diffusers", "single-file", "kohya"], default="diffusers")
    p.add_argument("--checkpoint", type=Path, help="<run>/checkpoints/unet/step-N (--format diffusers)")
    p.add_argument("--model", type=Path, help="a pipeline folder (--format single-file)")
    p.add_argument("--lora", type=Path, help="a LoRA folder written by ldm train (--format kohya)")
    p.add_argument("--output", type=Path, required=True, help="a folder (diffusers) or a .safetensors file")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA weights (--checkpoint)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="single-file weights' dtype")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    needs = {"diffusers": "checkpoint", "single-file": "model", "kohya": "lora"}[args.format]
    if getattr(args, needs) is None:
        raise UsageError(f"ldm export --format {args.format} needs --{needs}")
    if args.format == "single-file":
        from .formats import save_single_file

        written = save_single_file(args.model, args.output, args.dtype)
    elif args.format == "kohya":
        from .formats import save_kohya_lora

        written = save_kohya_lora(args.lora, args.output)
    else:
        from ldm_pipeline.training.export import export_checkpoint

        written = export_checkpoint(args.checkpoint, args.output, use_ema=not args.raw)
    print(f"wrote {written}")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect a training data source")
    verbs = p.add_subparsers(dest="data_command", required=True)
    c = verbs.add_parser("check", help="decode every image as training would: counts, sizes, captions, skips")
    c.add_argument("source", help="folder, CSV/JSONL/Parquet file, save_to_disk folder or Hub dataset id")
    c.add_argument("--caption-column", default=None, help="default: text, caption or prompt")
    c.add_argument("--image-column", default=None, help="default: image, file_name, image_path, path or file")
    c.add_argument("--split", default="train")
    c.add_argument("--resolution", type=_positive_int, default=None, help="show the aspect buckets at this size")
    c.add_argument("--bucket-step", type=_positive_int, default=64, help="bucket sides' multiple (SD: 64)")
    c.add_argument("--max-aspect", type=_aspect, default=2.0)
    c.add_argument("--max-pixels", type=_positive_int, default=None, help="skip larger images (default 64M)")
    c.add_argument("--json", type=Path, default=None, help="also write the whole report here")
    c.set_defaults(func=_data_check)


def _data_check(args: argparse.Namespace) -> None:
    import json

    from .data.check import check_source, format_report
    from .tokenizer import load_clip_tokenizer

    report = check_source(
        args.source,
        args.caption_column,
        args.image_column,
        args.split,
        resolution=args.resolution,
        bucket_step=args.bucket_step,
        max_aspect=args.max_aspect,
        **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
        tokenizer=load_clip_tokenizer(),
    )
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if not report["usable"]:
        raise InputError(f"{args.source}: no usable image")


def build_parser() -> argparse.ArgumentParser:
    """The ``ldm`` argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(prog="ldm", description="latent diffusion text-to-image")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of any error (also: LDM_TRACEBACK=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_train(sub)
    _add_quickstart(sub)
    _add_eval(sub)
    _add_data(sub)
    _add_export(sub)
    _add_push(sub)
    _add_app(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ldm`` command. The user's errors (`UsageError`, a missing or forbidden path, a full
    disk, out of memory) print one line and return 2; anything else is a bug and keeps its
    traceback, as every error does with ``--traceback`` or ``LDM_TRACEBACK=1``."""
    parser = build_parser()
    # Overrides may follow options (`ldm train c.yaml --output o unet.steps=5`), which argparse
    # does not match to a positional after a sub-command: collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    full = args.traceback or os.environ.get("LDM_TRACEBACK", "") not in ("", "0")
    try:
        args.func(args)
    except (UsageError, OSError) as err:
        if full or not (isinstance(err, UsageError) or user_os_error(err)):
            raise
        _end_progress_bars()
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if full or not out_of_memory(err):
            raise
        _end_progress_bars()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ldm {args.command}: error: out of memory ({first}); try a smaller size or batch", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _end_progress_bars() -> None:
    """Close the progress bars an error cut short, so that the error starts its own line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
