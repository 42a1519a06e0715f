"""Safe loading: safetensors only unless asked, every key checked, corrupt files named; config fuzzing."""

import contextlib
import json
import shutil
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldm_pipeline.training.config import ConfigError, config_from_dict
from ldm_pipeline.training.loop import NonFiniteError, check_finite
from safetensors.torch import load_file, save_file

from ldm_pipeline.cli import main
from ldm_pipeline.loading import ModelLoadError, load_lora, load_pipeline

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def copy(tiny_dir, tmp_path):
    path = tmp_path / "pipe"
    shutil.copytree(tiny_dir, path)
    return path


def test_a_clean_folder_loads_with_the_same_weights(tiny_dir):
    pipe = load_pipeline(tiny_dir)
    saved = load_file(tiny_dir / UNET_WEIGHTS)
    assert all(torch.equal(v, saved[k]) for k, v in pipe.unet.state_dict().items())


def test_missing_unexpected_and_misshaped_keys_are_named(copy):
    weights = load_file(copy / UNET_WEIGHTS)
    weights.pop("conv_in.bias")
    weights["stray.weight"] = torch.zeros(2)
    save_file(weights, copy / UNET_WEIGHTS)
    with pytest.raises(ModelLoadError, match=r"unet do not match .*missing keys: \['conv_in.bias'\].*stray.weight"):
        load_pipeline(copy)


def test_pickle_weights_are_refused_unless_allowed(copy, capsys):
    weights = load_file(copy / UNET_WEIGHTS)
    (copy / UNET_WEIGHTS).unlink()
    torch.save(weights, copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"unet has only pickle weights \(diffusion_pytorch_model.bin\)"):
        load_pipeline(copy)
    assert torch.equal(load_pipeline(copy, allow_pickle=True).unet.conv_in.bias, weights["conv_in.bias"])
    args = ["generate", "--model", str(copy), "--prompt", "x", "--steps", "1", "--out", str(copy / "x.png")]
    assert main(args) == 2 and "only pickle weights" in capsys.readouterr().err


def test_truncated_weights_and_broken_json_give_clear_errors(copy):
    data = (copy / UNET_WEIGHTS).read_bytes()
    (copy / UNET_WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="could not load UNet2DConditionModel from .*unet"):
        load_pipeline(copy)
    (copy / UNET_WEIGHTS).write_bytes(data)
    (copy / "vae" / "config.json").write_text('{"in_channels": 3,')
    with pytest.raises(ModelLoadError, match="could not load AutoencoderKL from .*vae"):
        load_pipeline(copy)


def test_a_truncated_text_encoder_is_named(copy):
    (weights,) = (copy / "text_encoder").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load CLIPTextModel from .*text_encoder: Error while deser"):
        load_pipeline(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index: index.update(unet=["diffusers", "UNetNowhere"]), "unet names diffusers.UNetNowhere, which diff"),
        (lambda index: index.update(scheduler=["os", "system"]), "scheduler names the library 'os'; only"),
        (lambda index: index.update(vae="AutoencoderKL"), r"vae must be \[library, class\], got AutoencoderKL"),
        (lambda index: index.update(requires_safety_checker=True), None),  # a setting, not a component
        (lambda index: index.update(tokenizer=["transformers"]), r"tokenizer must be \[library, class\]"),
    ],
)
def test_a_model_index_naming_what_does_not_exist_is_refused(copy, edit, message):
    index = json.loads((copy / "model_index.json").read_text())
    edit(index)
    (copy / "model_index.json").write_text(json.dumps(index))
    if message is None:
        load_pipeline(copy)
        return
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(copy)


def test_a_model_index_that_is_not_json_is_named(copy):
    (copy / "model_index.json").write_text('{"unet": ["diffusers",')
    with pytest.raises(ModelLoadError, match="model_index.json: not valid JSON"):
        load_pipeline(copy)
    (copy / "model_index.json").write_text("[]")
    with pytest.raises(ModelLoadError, match="model_index.json: must be a JSON object, got a list"):
        load_pipeline(copy)


def test_non_finite_weights_are_refused_when_loaded_naming_the_component_and_key(copy):
    (path,) = (copy / "vae").glob("*.safetensors")
    weights = load_file(path)
    weights["decoder.conv_out.bias"][0] = float("nan")
    save_file(weights, path)
    with pytest.raises(
        ModelLoadError, match=r"vae holds non-finite weights \(NaN or Inf\) in \['decoder.conv_out.bias'\]"
    ):
        load_pipeline(copy)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (b"not safetensors", r"LoRA .*pytorch_lora_weights.safetensors is unreadable: Error while deserializing"),
        ({"unet.conv_in.lora_A.weight": torch.full((2, 4), float("nan"))}, "holds non-finite weights"),
        ({"unet.nowhere.lora_A.weight": torch.zeros(2, 4)}, r"does not fit this pipeline: Target modules"),
        (None, "no pytorch_lora_weights.safetensors in it"),
    ],
)
def test_a_broken_lora_folder_is_one_clear_error(tiny_dir, tmp_path, capsys, weights, message):
    lora = tmp_path / "lora"
    lora.mkdir()
    if isinstance(weights, bytes):
        (lora / "pytorch_lora_weights.safetensors").write_bytes(weights)
    elif weights is not None:
        weights[next(iter(weights)).replace("lora_A", "lora_B")] = torch.zeros(4, 2)
        save_file(weights, lora / "pytorch_lora_weights.safetensors")
    pipe = load_pipeline(tiny_dir)
    with pytest.raises(ModelLoadError, match=message):
        load_lora(pipe, lora)
    args = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--steps", "1", "--lora", str(lora)]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm generate: error: ") and len(err.splitlines()) == 1, err


def test_non_finite_weights_are_never_saved():
    layer = torch.nn.Linear(2, 2)
    check_finite(layer, "a layer")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not saving a layer: non-finite weights in \['weight'\]"):
        check_finite(layer, "a layer")


_keys = st.sampled_from(
    [
        "model",
        "data",
        "vae",
        "clip",
        "unet",
        "steps",
        "lora",
        "rank",
        "seed",
        "x",
        "pretrained",
        "resolution",
        "bucketing",
        "batch_size",
        "learning_rate",
        "timestep_range",
        "background",
        "max_aspect",
        "holdout",
        "mixed_precision",
        "prediction_type",
        "crop_size",
        "max_minutes",
        "zero_terminal_snr",
        "num_samples",
    ]
)
_leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=8))
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4))


def _no_lookups(*args, **kwargs):
    raise AssertionError("the config check read a model config from disk or the Hub")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=5))
def test_config_check_raises_only_config_errors_and_reads_nothing(data):
    patched = mock.patch("ldm_pipeline.training.config.load_component_config", _no_lookups)
    with patched, contextlib.suppress(ConfigError):  # any other exception fails the test
        config_from_dict(data, resolved=False)
