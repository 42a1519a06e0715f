"""``ldm quickstart``: train vae → clip → unet on shapes from zero, then sample and evaluate."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ldm_pipeline.evaluation import evaluate
from ldm_pipeline.images import image_grid
from ldm_pipeline.loading import load_pipeline
from ldm_pipeline.presets import build_unet, build_vae, get_preset

from ..configs import shipped
from .attention import use_cpu_attention
from .config import RunConfig, StageConfig, load_config
from .hardware import default_mixed_precision, describe_machine
from .loop import make_optimizer
from .run import quality_summary, train
from .vae import Autoencode

GRID_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a black background",
    "a yellow triangle on a gray background",
    "a green circle on a black background",
    "a purple square on a white background",
    "a cyan triangle on a black background",
    "a red triangle on a gray background",
    "a green square on a white background",
)

# The recipes are the shipped YAML files (configs/, installed as ldm_pipeline.configs): the shapes
# recipe with quality targets, and a smoke run of the tiny preset in seconds.
RECIPE, SMOKE = "shapes.yaml", "tiny.yaml"
# What the time estimate assumes: the steps the recipe took to reach its targets (`ldm quickstart`
# on a 2-core AMD EPYC with AVX-512 BF16, benchmarks/README.md: VAE 900, UNet 2,250), the cost of
# the quality checks per step, and the rest of the run (data, CLIP stage, caches, the final grid
# and evaluation) in UNet steps.
EXPECTED_STEPS = {"vae": 900, "unet": 2250}
CHECK_OVERHEAD = {"vae": 1.02, "unet": 1.1}
OTHER_UNET_STEPS = 300


def quickstart_config(smoke: bool = False, overrides: list[str] | None = None) -> RunConfig:
    """The quick start's config (the shapes recipe within the time budget), or the smoke version."""
    return load_config(shipped(SMOKE if smoke else RECIPE), overrides)


def _time_steps(step: Callable[[], None], warmup: int = 2, timed: int = 3) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls (the first ones pay for allocation)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    return (time.perf_counter() - start) / timed


def synthetic_inputs(cfg: RunConfig) -> dict[str, tuple[torch.Tensor, ...]]:
    """Random training inputs of the run's VAE (images) and UNet (latents, timesteps, text
    embeddings) at their configured batch sizes, shaped as the preset's models take them."""
    preset = get_preset(cfg.model)
    side, factor = cfg.data.resolution, 2 ** (len(preset.vae.channels) - 1)
    generator = torch.Generator().manual_seed(0)
    n = cfg.unet.batch_size
    return {
        "vae": (torch.rand((cfg.vae.batch_size, 3, side, side), generator=generator) * 2 - 1,),
        "unet": (
            torch.randn((n, preset.vae.latent_channels, side // factor, side // factor), generator=generator),
            torch.randint(0, 1000, (n,), generator=generator),
            torch.randn((n, preset.text.max_length, preset.text.hidden_size), generator=generator),
        ),
    }


def seconds_per_step(cfg: RunConfig) -> dict[str, float]:
    """A few training steps of the run's VAE and UNet, on random data at the configured batch
    sizes and precision: this machine's pace for each stage, before any data is made."""
    preset = get_preset(cfg.model)
    bf16 = (default_mixed_precision() if cfg.mixed_precision == "auto" else cfg.mixed_precision) == "bf16"
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16 and not torch.cuda.is_available())
    inputs = synthetic_inputs(cfg)

    def trainer(model: torch.nn.Module, stage: StageConfig, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        optimizer = make_optimizer(model.parameters(), stage)

        def step() -> None:
            with autocast():
                value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    autoencode = Autoencode(build_vae(preset))
    vae_loss = lambda: autoencode(*inputs["vae"])[0].float().pow(2).mean()  # noqa: E731
    paces = {"vae": _time_steps(trainer(autoencode, cfg.vae, vae_loss))}
    unet = build_unet(preset)
    use_cpu_attention(unet)
    unet_loss = lambda: unet(*inputs["unet"]).sample.float().pow(2).mean()  # noqa: E731
    paces["unet"] = _time_steps(trainer(unet, cfg.unet, unet_loss))
    return paces


def expected_minutes(paces: dict[str, float]) -> float:
    """Minutes the quick start should take at these paces: the steps its recipe took to reach its
    targets when measured (`EXPECTED_STEPS`), their quality checks, and the rest of the run."""
    stages = sum(EXPECTED_STEPS[s] * paces[s] * CHECK_OVERHEAD[s] for s in EXPECTED_STEPS)
    return (stages + OTHER_UNET_STEPS * paces["unet"]) / 60


def quickstart(
    out: str | Path = "runs/quickstart",
    smoke: bool = False,
    eval_samples: int | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Train every stage, write ``grid.png`` and ``eval.json`` and return the evaluation."""
    out = Path(out)
    cfg = quickstart_config(smoke, overrides)
    start = time.monotonic()
    line = describe_machine(cfg.mixed_precision)
    if not smoke and not torch.cuda.is_available():
        paces = seconds_per_step(cfg)
        line += (
            f"; first steps: VAE {paces['vae']:.2f} s, UNet {paces['unet']:.2f} s, so about "
            f"{expected_minutes(paces):.0f} min to the targets (ceilings: VAE {cfg.vae.max_minutes:g} min, "
            f"UNet {cfg.unet.max_minutes:g} min)"
        )
    print(line, flush=True)
    report = train(cfg, out)
    train_minutes = (time.monotonic() - start) / 60

    pipe = load_pipeline(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    grid = pipe(list(GRID_PROMPTS), generator=[torch.Generator().manual_seed(i) for i in range(8)]).images
    # Small images are enlarged (nearest neighbour) to at least 128 pixels a side for viewing.
    image_grid(grid, cols=4, scale=max(1, 128 // grid[0].width)).save(out / "grid.png")

    metrics, _ = evaluate(pipe, "shapes", num_samples=eval_samples or (16 if smoke else 200), clip_dir=out / "clip")
    metrics.update(
        train_minutes=round(train_minutes, 2), total_minutes=round((time.monotonic() - start) / 60, 2), stages=report
    )
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    metrics["quality_summary"] = quality_summary(report, cfg, out)
    return metrics
