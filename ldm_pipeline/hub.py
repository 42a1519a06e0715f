"""Share a model on the Hugging Face Hub: a model card, and an upload of safetensors and JSON only.

`model_card` writes the card from what a run folder records (the resolved ``config.yaml``,
``train_report.json``, ``eval.json``, ``grid.png``); `push` uploads a pipeline folder or a LoRA
folder with that card through ``huggingface_hub`` (``HF_ENDPOINT`` selects another endpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCardData
from huggingface_hub import constants as hf_constants

from .data.emoji import ATTRIBUTION as EMOJI_ATTRIBUTION
from .data.emoji import LICENSE as EMOJI_LICENSE
from .errors import InputError
from .loading import LORA_WEIGHTS
from .yaml_io import parse_yaml

# What a model repository gets: weights as safetensors, configs, tokenizer files, the card, images.
UPLOAD_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".png")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# What a push says when huggingface_hub's offline mode is on.
OFFLINE = (
    "the Hugging Face Hub's offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
    "pushing needs it off: unset it (or set it to 0) and push again"
)


def hub_offline() -> bool:
    """Whether huggingface_hub's offline mode is on: the flag its requests check before they go
    out (it reads the environment when imported)."""
    return bool(hf_constants.HF_HUB_OFFLINE)


class HubError(InputError):
    """A folder that cannot be shared as it is; the message says why."""


def _kind(model_dir: Path) -> str:
    if (model_dir / "model_index.json").is_file():
        return "pipeline"
    if (model_dir / LORA_WEIGHTS).is_file():
        return "lora"
    raise HubError(f"{model_dir} is neither a pipeline folder (model_index.json) nor a LoRA folder ({LORA_WEIGHTS})")


def _read(path: Path, loader) -> dict:
    """A run's side file (config, report) as a mapping; {} when absent; a clear error when broken."""
    if not path.is_file():
        return {}
    try:
        data = loader(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise HubError(f"{path}: unreadable ({err}); fix or remove it to write the model card") from err
    if data is not None and not isinstance(data, dict):
        raise HubError(f"{path}: expected a mapping, got a {type(data).__name__}; fix or remove it")
    return data or {}


def _metric_lines(train_report: dict, evaluation: dict) -> list[str]:
    lines = []
    names = {
        "all_correct": "shapes adherence, all of colour, shape and background correct",
        "color_accuracy": "colour correct",
        "shape_accuracy": "shape correct",
        "background_accuracy": "background correct",
        "digit_accuracy": "digit accuracy",
        "clip_score": "CLIP score",
        "psnr": "VAE PSNR (dB)",
    }
    for key, label in names.items():
        if isinstance(evaluation.get(key), (int, float)):
            lines.append(f"| {label} | {evaluation[key]:.4g} |")
    for stage in ("vae", "clip", "unet"):
        info = train_report.get(stage)
        if isinstance(info, dict) and "steps" in info:
            lines.append(f"| {stage} training | {info['steps']} steps, {info.get('minutes', '?')} min |")
    return lines


def model_card(model_dir: str | Path, repo_id: str, license: str | None = None, grid: str | None = None) -> str:
    """The README.md of the Hub repository for ``model_dir`` (a pipeline or LoRA folder).

    The run folder around it (``model_dir/..``), when there is one, supplies the resolved
    training config, the metrics and the base model of a fine-tune.

    Args:
        repo_id: the repository the usage snippet loads from.
        license: the card's licence; default apache-2.0, or the data's own share-alike licence
            (cc-by-sa-4.0) for a model trained on the built-in emoji.
        grid: the repository path of a sample grid to show, if one is uploaded.
    """
    model_dir = Path(model_dir)
    kind = _kind(model_dir)
    run = model_dir.parent
    config = _read(run / "config.yaml", lambda text: parse_yaml(text, str(run / "config.yaml")))
    report = _read(run / "train_report.json", json.loads)
    evaluation = _read(run / "eval.json", json.loads)
    base_model = config.get("pretrained") or (config.get("unet") or {}).get("pretrained")
    data = config.get("data") or {}
    dataset = data.get("source") or data.get("name")
    on_emoji = not data.get("source") and data.get("name") == "emoji"
    license = license or (EMOJI_LICENSE if on_emoji else "apache-2.0")
    tags = ["text-to-image", "diffusers", "latent-diffusion", "ldm-pipeline"]
    if kind == "lora":
        tags.append("lora")
    distilled = isinstance((config.get("unet") or {}).get("distill"), dict)
    if distilled:
        tags.append("lcm")
    card = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        tags=tags,
        base_model=base_model if base_model and "/" in base_model and not os.path.exists(base_model) else None,
        datasets=[dataset] if dataset and "/" in dataset and not os.path.exists(dataset) else None,
    )
    if kind == "lora" and distilled:
        base = base_model or "<the base pipeline>"
        usage = (
            "from diffusers import LCMScheduler, StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n'
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
            f'pipe.load_lora_weights("{repo_id}")\n'
            "# 2-8 steps; guidance 1: the adapters learnt the guided teacher\n"
            'image = pipe("your prompt", num_inference_steps=4, guidance_scale=1.0).images[0]'
        )
        what = f"LCM-LoRA adapters for `{base}` (latent consistency distillation), trained with ldm-pipeline."
    elif distilled:
        usage = (
            "from diffusers import LatentConsistencyModelPipeline\n\n"
            f'pipe = LatentConsistencyModelPipeline.from_pretrained("{repo_id}", safety_checker=None)\n'
            "# 2-8 steps, no guidance batch: the guidance scale goes in through the UNet's embedding\n"
            'image = pipe("your prompt", num_inference_steps=4, guidance_scale=2.5).images[0]\n\n'
            "# or with ldm-pipeline: `ldm generate --model ...` (4 steps by default)"
        )
        what = f"A latent consistency model distilled from `{base_model}` with ldm-pipeline: few-step sampling."
    elif kind == "lora":
        base = base_model or "<the base pipeline>"
        usage = (
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            'image = pipe("your prompt").images[0]'
        )
        what = f"LoRA adapters for `{base}`, trained with ldm-pipeline."
    else:
        usage = (
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}", safety_checker=None)\n'
            'image = pipe("a red circle on a white background", guidance_scale=2.5).images[0]\n\n'
            "# or with ldm-pipeline: LatentDiffusionPipeline.from_pretrained(...), `ldm generate --model ...`"
        )
        origin = f"fine-tuned from `{base_model}`" if base_model else "trained from zero"
        what = f"A latent diffusion text-to-image pipeline ({origin}) made with ldm-pipeline."
    sections = [f"---\n{card.to_yaml()}\n---", f"# {repo_id.split('/')[-1]}", what]
    if grid:
        sections.append(f"![samples]({grid})")
    sections.append(f"## Use it\n\n```python\n{usage}\n```")
    if on_emoji:
        sections.append(
            "## Training data\n\nThe built-in emoji dataset: OpenMoji (https://openmoji.org) rendered on white. "
            f"{EMOJI_ATTRIBUTION}. The model and the images it makes are shared under the same licence."
        )
    metrics = _metric_lines(report, evaluation)
    if metrics:
        sections.append("## Evaluation\n\n| measure | value |\n| --- | --- |\n" + "\n".join(metrics))
    if config:
        resolved = yaml.safe_dump(config, sort_keys=False).strip()
        sections.append(f"## How it was trained\n\nThe resolved training config:\n\n```yaml\n{resolved}\n```")
    return "\n\n".join(sections) + "\n"


def push(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    license: str | None = None,
    commit_message: str = "Upload model with ldm-pipeline",
) -> str:
    """Upload a pipeline or LoRA folder with its model card; returns the commit URL.

    Only safetensors weights, JSON configs, tokenizer files and images are uploaded; a folder
    holding pickle weights is refused. A ``grid.png`` beside the model (in the run folder) is
    uploaded and shown on the card.

    Raises:
        HubError: not a model folder, it holds pickle weights, or the Hub's offline mode is on.
    """
    model_dir = Path(model_dir)
    _kind(model_dir)
    files = [p for p in sorted(model_dir.rglob("*")) if p.is_file()]
    pickles = [str(p.relative_to(model_dir)) for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise HubError(f"{model_dir} holds pickle weights {pickles[:5]}: convert them to safetensors first")
    if hub_offline():
        raise HubError(OFFLINE)
    grid = model_dir.parent / "grid.png"
    with tempfile.TemporaryDirectory() as staging:
        staging_dir = Path(staging)
        for path in files:
            if path.suffix in UPLOAD_SUFFIXES and path.name != "README.md":
                target = staging_dir / path.relative_to(model_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        if grid.is_file():
            shutil.copy2(grid, staging_dir / "grid.png")
        card = model_card(model_dir, repo_id, license, "grid.png" if grid.is_file() else None)
        (staging_dir / "README.md").write_text(card, encoding="utf-8")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=staging_dir, repo_id=repo_id, repo_type="model", commit_message=commit_message
        )
    return str(getattr(info, "commit_url", info))
