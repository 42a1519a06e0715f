"""Sharing: the model card on its own, and ``ldm push`` against a local stand-in for the Hub.

The upload test talks to tests/helpers/fake_hub.py, a small HTTP server on loopback that
answers the endpoints huggingface_hub uses (``HF_ENDPOINT`` points it there). It is a stand-in,
not the Hub: it checks what our code sends, not how the Hub would take it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from ldm_pipeline.cli import main
from ldm_pipeline.hub import HubError, model_card, push
from ldm_pipeline.loading import load_pipeline

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fake_hub import FakeHub  # noqa: E402


@pytest.fixture
def run_dir(tiny_dir, tmp_path):
    """A run folder as training leaves it: pipeline, resolved config, metrics, sample grid."""
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "pipeline")
    config = {"model": "tiny", "data": {"name": "shapes", "resolution": 32}, "unet": {"steps": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "eval.json").write_text(json.dumps({"all_correct": 0.976, "color_accuracy": 1.0}))
    (run / "train_report.json").write_text(json.dumps({"unet": {"steps": 3, "minutes": 0.1}}))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(run / "grid.png")
    return run


def test_card_of_a_pipeline_has_metadata_config_metrics_and_usage(run_dir):
    text = model_card(run_dir / "pipeline", "me/shapes", grid="grid.png")
    card = ModelCard(text)
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0" and "text-to-image" in card.data.tags
    assert card.data.base_model is None  # trained from zero
    assert "![samples](grid.png)" in text and 'StableDiffusionPipeline.from_pretrained("me/shapes"' in text
    assert "| shapes adherence, all of colour, shape and background correct | 0.976 |" in text
    assert "| unet training | 3 steps, 0.1 min |" in text
    assert "```yaml\nmodel: tiny\n" in text or "model: tiny" in text.split("```yaml")[1]


def test_card_of_a_lora_names_its_base_model_and_dataset(tmp_path):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    config = {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "data": {"source": "someone/captions"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = ModelCard(model_card(run / "lora", "me/style-lora"))
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.datasets == ["someone/captions"] and "lora" in card.data.tags
    assert 'pipe.load_lora_weights("me/style-lora")' in card.text
    with pytest.raises(HubError, match="neither a pipeline folder"):
        model_card(tmp_path, "me/x")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("config.yaml", "unet: [1\n", r"config.yaml, line 2, column 1: not valid YAML"),
        ("config.yaml", "- a list\n", "config.yaml: expected a mapping, got a list"),
        ("train_report.json", "{not json", r"train_report.json: unreadable \(Expecting property name"),
        ("eval.json", "[1, 2]", "eval.json: expected a mapping, got a list"),
    ],
)
def test_a_broken_side_file_of_the_run_is_named_when_writing_the_card(run_dir, name, text, message):
    (run_dir / name).write_text(text)
    with pytest.raises(HubError, match=message):
        model_card(run_dir / "pipeline", "me/shapes")


def test_card_of_a_model_trained_on_emoji_carries_openmojis_licence_and_attribution(run_dir):
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "data": {"name": "emoji"}}))
    card = ModelCard(model_card(run_dir / "pipeline", "me/emoji"))
    assert card.data.license == "cc-by-sa-4.0"
    assert (
        "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0" in card.text
    )
    assert ModelCard(model_card(run_dir / "pipeline", "me/emoji", license="mit")).data.license == "mit"


def test_push_refuses_pickle_weights(run_dir):
    torch.save({"w": torch.zeros(1)}, run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(HubError, match="pickle weights"):
        push(run_dir / "pipeline", "me/x")


@pytest.mark.slow
@pytest.mark.parametrize("callers_shell", ["online", "HF_HUB_OFFLINE=1"])
def test_ldm_push_uploads_a_loadable_pipeline_with_its_card(run_dir, tmp_path, monkeypatch, callers_shell):
    if callers_shell != "online":  # the test sets the environment it needs, whatever the caller exported
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")  # whatever the caller's shell says
        args = ["--model", str(run_dir / "pipeline"), "--repo-id", "me/shapes", "--private", "--token", "hf_test"]
        done = subprocess.run(
            [sys.executable, "-m", "ldm_pipeline.cli", "push", *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"{hub.url}/me/shapes/commit/" in done.stdout
        created = hub.repos["me/shapes"]
        assert created.get("private") is True or created.get("visibility") == "private", created
        assert all(h.get("authorization") == "Bearer hf_test" for m, p, h in hub.requests if p.startswith("/api/"))
        files = hub.files["me/shapes"]
    assert not [name for name in files if name.endswith((".bin", ".pt", ".ckpt"))]
    assert {"README.md", "grid.png", "model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert ModelCard(files["README.md"].decode()).data.pipeline_tag == "text-to-image"
    downloaded = tmp_path / "downloaded"
    for name, data in files.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    pulled, original = load_pipeline(downloaded), load_pipeline(run_dir / "pipeline")
    theirs = original.unet.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in pulled.unet.state_dict().items())


@pytest.mark.slow
def test_training_pushes_its_result_when_asked(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from ldm_pipeline.training.quickstart import quickstart_config
    from ldm_pipeline.training.run import train

    with FakeHub() as hub:
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # whatever the caller's shell says
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        overrides = ["report_to=none", "vae.steps=2", "clip.steps=2", "unet.steps=2", "push_to_hub=me/smoke"]
        report = train(quickstart_config(smoke=True, overrides=overrides), tmp_path)
        files = hub.files["me/smoke"]
    assert report["hub"].startswith(f"{hub.url}/me/smoke/commit/")
    assert "unet/diffusion_pytorch_model.safetensors" in files and "README.md" in files
    assert "steps: 2" in files["README.md"].decode()  # the resolved config is on the card


def test_pushing_while_offline_is_one_line_and_uploads_nothing(run_dir, capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 in the shell
    assert main(["push", "--model", str(run_dir / "pipeline"), "--repo-id", "me/shapes", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm push: error: the Hugging Face Hub's offline mode is on (HF_HUB_OFFLINE")
    assert "pushing needs it off" in err and len(err.splitlines()) == 1


def test_a_run_that_cannot_push_keeps_its_outputs_and_says_where(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    steps = ["vae.steps=1", "clip.steps=1", "unet.steps=1", "report_to=none", "unet.validation_every_steps=null"]
    config = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    assert main(["train", config, "--output", str(out), *steps, "push_to_hub=me/tiny"]) == 2
    captured = capsys.readouterr()
    assert "warning: push_to_hub: the Hugging Face Hub's offline mode is on" in captured.out
    assert "Traceback" not in captured.err
    err = captured.err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("ldm train: error: push_to_hub: the Hugging Face Hub's offline mode is on")
    assert f"The run's outputs are kept in {out}" in err
    assert f"`ldm push --model {out / 'pipeline'} --repo-id me/tiny`" in err
    assert load_pipeline(out / "pipeline").unet is not None
    assert "unet" in json.loads((out / "train_report.json").read_text())
