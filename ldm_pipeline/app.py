"""``ldm app``: a Gradio page to try a pipeline by typing prompts.

`build_app` lays out the controls a diffusers user expects (prompt, negative prompt, steps,
guidance, seed, scheduler, number of images, size), shows the images in a gallery with the seed
that made them, reports progress per denoising step, and turns a bad input into a message on the
page instead of a dead request.
"""

from __future__ import annotations

import math
import os
import random

import torch

from .pipeline import LatentDiffusionPipeline
from .schedulers import SCHEDULERS, make_scheduler, sampling_defaults

# No usage reports from a page served on this machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MODEL_SCHEDULER = "the model's own"
MAX_SEED = 2**31 - 1


def _whole(value: object, field: str) -> int:
    """A field's value as an int: the web page sends numbers as floats, and an API caller anything."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{field} must be a whole number, got {value!r}")
    return int(value)


def generate(
    pipe: LatentDiffusionPipeline,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    seed: int,
    scheduler: str,
    num_images: int,
    width: int,
    height: int,
    on_step=None,
) -> tuple[list, int]:
    """Images for one request and the seed used (``seed < 0``: a random one).

    Raises:
        ValueError: an empty prompt or a value the pipeline refuses (the message names it).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt first")
    steps, num_images, width, height = (
        _whole(v, name) for v, name in ((steps, "Steps"), (num_images, "Images"), (width, "Width"), (height, "Height"))
    )
    seed = random.randint(0, MAX_SEED) if seed is None or _whole(seed, "Seed") < 0 else _whole(seed, "Seed")
    if seed > MAX_SEED:
        raise ValueError(f"Seed must be at most {MAX_SEED} (or -1 for a random one), got {seed}")
    original = pipe.scheduler
    if scheduler and scheduler != MODEL_SCHEDULER:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"Scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        pipe.scheduler = make_scheduler(scheduler, original.config)

    def callback(_pipe, step: int, _t, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, steps)
        return tensors

    try:
        images = pipe(
            prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            num_images_per_prompt=num_images,
            width=width,
            height=height,
            generator=torch.Generator().manual_seed(seed),
            callback_on_step_end=callback,
        ).images
    finally:
        pipe.scheduler = original
    return images, seed


def build_app(pipe: LatentDiffusionPipeline, title: str = "ldm-pipeline"):
    """The Gradio Blocks page for ``pipe`` (call ``.launch()`` on it)."""
    import gradio as gr

    pipe.set_progress_bar_config(disable=True)
    size, factor = pipe.default_size, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    # The sliders start at the pipeline's defaults: an LCM pipeline's few steps (and guidance 1
    # for an LCM-LoRA, which has no guidance input).
    start = {"num_inference_steps": 20, "guidance_scale": 2.5, **sampling_defaults(pipe)}

    # Gradio finds the progress tracker through this default value.
    tracker = gr.Progress()

    def run(prompt, negative_prompt, steps, guidance, seed, scheduler, num_images, width, height, progress=tracker):
        try:
            images, used = generate(
                pipe,
                prompt,
                negative_prompt,
                steps,
                guidance,
                seed,
                scheduler,
                num_images,
                width,
                height,
                on_step=lambda done, total: progress(min(done / total, 1.0), desc=f"evaluation {done}"),
            )
        except ValueError as err:
            raise gr.Error(str(err)) from err
        return images, f"Seed: {used}"

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nType a prompt and press Generate.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=start["num_inference_steps"], step=1, label="Steps")
                    guidance = gr.Slider(0.0, 15.0, value=start["guidance_scale"], step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                    scheduler = gr.Dropdown(
                        [MODEL_SCHEDULER, *sorted(SCHEDULERS)], value=MODEL_SCHEDULER, label="Scheduler"
                    )
                with gr.Row():
                    num_images = gr.Slider(1, 8, value=4, step=1, label="Images")
                    width = gr.Slider(factor, 4 * size, value=size, step=factor, label="Width")
                    height = gr.Slider(factor, 4 * size, value=size, step=factor, label="Height")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2, elem_id="gallery")
                used_seed = gr.Markdown(elem_id="used-seed")
        inputs = [prompt, negative, steps, guidance, seed, scheduler, num_images, width, height]
        button.click(run, inputs=inputs, outputs=[gallery, used_seed])
        prompt.submit(run, inputs=inputs, outputs=[gallery, used_seed])
    return app
