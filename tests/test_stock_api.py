"""The pipeline answers a diffusers user's calls as stock `StableDiffusionPipeline` does, on the
same components: per-call LoRA scale, clip_skip, eta, callbacks that turn guidance off, custom
timesteps, an old scheduler config, an LCM-style guidance embedding, IP-Adapter image prompts,
textual inversion, several LoRAs fused or weighted, from_single_file."""

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from ldm_pipeline.training.config import LoRAConfig
from ldm_pipeline.training.lora import add_lora, save_lora
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from ldm_pipeline import LatentDiffusionPipeline, build_pipeline
from ldm_pipeline.formats import save_single_file
from ldm_pipeline.pipeline import logger as pipeline_logger

PROMPT = "a photo number 3"


def _both(folder, **components):
    ours = LatentDiffusionPipeline.from_pretrained(folder, **components)
    stock = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, **components
    )
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    return ours, stock


def _run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 2.5)  # stock's default is 7.5, ours 2.5
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def _same(ours, stock, **kwargs):
    mine = _run(ours, **kwargs)
    np.testing.assert_allclose(mine, _run(stock, **kwargs), atol=1e-5)
    return mine


def _lora_folder(tmp_path, seed: int, name: str):
    """A LoRA on the tiny UNet's attention with non-zero weights (B starts at zero when trained)."""
    pipe = build_pipeline("tiny")
    add_lora(pipe.unet, LoRAConfig(rank=2, alpha=2), ["to_q", "to_k", "to_v", "to_out.0"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in pipe.unet.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    save_lora(tmp_path / name, pipe.unet, None)
    return tmp_path / name


def test_call_and_encode_prompt_take_every_argument_stock_takes():
    for method in ("__call__", "encode_prompt"):
        stock = set(inspect.signature(getattr(StableDiffusionPipeline, method)).parameters) - {"kwargs"}
        assert stock <= set(inspect.signature(getattr(LatentDiffusionPipeline, method)).parameters), method


def test_encode_prompt_equals_stocks(tiny_dir):
    ours, stock = _both(tiny_dir)
    args = (PROMPT, torch.device("cpu"), 2, True, "blurry")
    for mine, theirs in zip(ours.encode_prompt(*args), stock.encode_prompt(*args), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert ours.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[1] is None


def test_embeddings_from_a_text_only_pipeline_drive_one_without_text_parts(tiny_dir):
    """Cache embeddings with the text parts alone, sample without them: the images of the whole pipeline."""
    ours, _ = _both(tiny_dir)
    parts = {name: getattr(ours, name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    text_only = LatentDiffusionPipeline(**{k: v if "text" in k or "token" in k else None for k, v in parts.items()})
    assert text_only.vae_scale_factor == 8  # stock's assumption without a VAE
    embeds, negative = text_only.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    no_text = LatentDiffusionPipeline(**{k: None if "text" in k or "token" in k else v for k, v in parts.items()})
    no_text.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = no_text(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=3,
        guidance_scale=2.5,
        generator=generator,
        output_type="np",
    ).images
    np.testing.assert_allclose(images, _run(ours), atol=1e-6)
    with pytest.raises(ValueError, match="no text encoder"):
        no_text(PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="no text encoder"):  # guidance needs negative embeddings too
        no_text(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=2.5)


def test_clip_skip_conditions_on_an_earlier_layer(tiny_dir):
    ours, _ = _both(tiny_dir)
    embeds, _ = ours.encode_prompt(PROMPT, torch.device("cpu"), 1, False, clip_skip=1)
    with torch.no_grad():
        ids = ours.tokenizer(PROMPT, padding="max_length", max_length=ours.tokenizer.model_max_length).input_ids
        hidden = ours.text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
        expected = ours.text_encoder.final_layer_norm(hidden)
    torch.testing.assert_close(embeds, expected)
    assert np.abs(_run(ours, clip_skip=1) - _run(ours)).max() > 1e-4


def test_lora_scale_per_call_changes_the_image_as_stocks(tiny_dir, tmp_path):
    ours, stock = _both(tiny_dir)
    lora = _lora_folder(tmp_path, 0, "a")
    for pipe in (ours, stock):
        pipe.load_lora_weights(lora)
    full = _same(ours, stock)
    half = _same(ours, stock, cross_attention_kwargs={"scale": 0.5})
    off = _same(ours, stock, cross_attention_kwargs={"scale": 0.0})
    np.testing.assert_allclose(off, _run(LatentDiffusionPipeline.from_pretrained(tiny_dir)), atol=1e-5)
    assert np.abs(full - half).max() > 1e-3 and np.abs(half - off).max() > 1e-3


def test_traced_unet_does_not_ignore_per_call_settings(tiny_dir, tmp_path):
    ours, _ = _both(tiny_dir)
    ours.load_lora_weights(_lora_folder(tmp_path, 0, "a"))
    first, second = _run(ours), _run(ours)  # the second call may replay a trace
    np.testing.assert_array_equal(first, second)
    assert np.abs(_run(ours, cross_attention_kwargs={"scale": 0.3}) - second).max() > 1e-3


def test_several_loras_weighted_fused_and_unfused_as_stock(tiny_dir, tmp_path):
    ours, stock = _both(tiny_dir)
    for pipe in (ours, stock):
        pipe.load_lora_weights(_lora_folder(tmp_path, 0, "a"), adapter_name="a")
        pipe.load_lora_weights(_lora_folder(tmp_path, 1, "b"), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    weighted = _same(ours, stock)
    for pipe in (ours, stock):
        pipe.fuse_lora(adapter_names=["a", "b"])
        pipe.unload_lora_weights()
    np.testing.assert_allclose(_same(ours, stock), weighted, atol=1e-4)


def test_eta_and_custom_timesteps_sample_as_stock(tiny_dir):
    ours, stock = _both(tiny_dir)
    for pipe in (ours, stock):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    eta = _same(ours, stock, eta=0.8)
    assert np.abs(eta - _run(ours)).max() > 1e-4  # η > 0 adds noise
    for pipe in (ours, stock):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # Align Your Steps' SD 1.5 schedule, 10 steps (as diffusers' AYS test uses).
    steps = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    _same(ours, stock, timesteps=steps, num_inference_steps=None)
    assert ours.num_timesteps == len(steps)


def test_a_callback_can_turn_guidance_off_as_in_stock(tiny_dir):
    ours, stock = _both(tiny_dir)

    def no_guidance_after_step_one(pipe, i, t, tensors):
        if i == 1:
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 1.0
        return tensors

    seen = []

    def record(pipe, i, t, tensors):
        seen.append((pipe.guidance_scale, pipe.num_timesteps, pipe.do_classifier_free_guidance))
        return tensors

    kwargs = {
        "callback_on_step_end": no_guidance_after_step_one,
        "callback_on_step_end_tensor_inputs": ["prompt_embeds"],
    }
    changed = _same(ours, stock, guidance_scale=5.0, **kwargs)
    assert np.abs(changed - _run(ours, guidance_scale=5.0)).max() > 1e-4
    _run(ours, guidance_scale=5.0, callback_on_step_end=record)
    assert seen == [(5.0, 3, True)] * 3


def test_an_old_scheduler_config_is_normalised_as_stock_does(tiny_dir, tmp_path):
    folder = tmp_path / "old"
    LatentDiffusionPipeline.from_pretrained(tiny_dir).save_pretrained(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.update(_class_name="DDIMScheduler", steps_offset=0, clip_sample=True, timestep_spacing="leading")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDIMScheduler"]}))
    ours, stock = _both(folder)
    assert isinstance(ours.scheduler, DDIMScheduler)
    assert (ours.scheduler.config.steps_offset, ours.scheduler.config.clip_sample) == (1, False)
    ours.scheduler.set_timesteps(2)
    stock.scheduler.set_timesteps(2)
    assert ours.scheduler.timesteps.tolist() == stock.scheduler.timesteps.tolist() == [501, 1]
    _same(ours, stock, num_inference_steps=2)


def test_a_guidance_embedding_unet_gets_timestep_cond_as_in_stock(tiny_dir, tmp_path):
    folder = tmp_path / "lcm"
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 16})
    pipe.save_pretrained(folder)
    ours, stock = _both(folder)
    low = _same(ours, stock, guidance_scale=2.0)
    assert np.abs(low - _run(ours, guidance_scale=6.0)).max() > 1e-5  # the embedding carries the scale


@pytest.fixture
def ip_folder(tiny_dir, tmp_path):
    """The tiny pipeline with a tiny CLIP image encoder, and an IP-Adapter built in code for its UNet."""
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    )
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir, image_encoder=encoder, feature_extractor=extractor)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(cross * 4, 16) * 0.2,
        "image_proj.proj.bias": torch.zeros(cross * 4),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            hidden = attention.to_q.out_features
            for proj in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key}.{proj}.weight"] = torch.randn(hidden, cross) * 0.5
            key += 2
    save_file(tensors, tmp_path / "ip.safetensors")
    return folder, tmp_path


def test_ip_adapter_images_condition_the_output_as_in_stock(ip_folder):
    folder, weights = ip_folder
    ours, stock = _both(folder)
    for pipe in (ours, stock):
        pipe.load_ip_adapter(str(weights), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
        pipe.set_ip_adapter_scale(1.0)
    red = Image.new("RGB", (32, 32), (220, 30, 30))
    blue = Image.new("RGB", (32, 32), (30, 70, 230))
    with_red = _same(ours, stock, ip_adapter_image=red)
    assert np.abs(with_red - _run(ours, ip_adapter_image=blue)).max() > 1e-4
    embeds = ours.prepare_ip_adapter_image_embeds(red, None, torch.device("cpu"), 1, True)
    np.testing.assert_allclose(_run(ours, ip_adapter_image_embeds=embeds), with_red, atol=1e-5)


def test_textual_inversion_tokens_load_and_condition_as_in_stock(tiny_dir, tmp_path):
    ours, stock = _both(tiny_dir)
    width = ours.text_encoder.get_input_embeddings().weight.shape[1]
    embedding = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    for pipe in (ours, stock):
        pipe.load_textual_inversion({"<sks>": embedding})

    def sample(pipe, prompt):
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt, generator=generator, num_inference_steps=3, guidance_scale=2.5, output_type="np").images

    mine = sample(ours, "a <sks> photo")
    np.testing.assert_allclose(mine, sample(stock, "a <sks> photo"), atol=1e-5)
    assert "<sks>_1" in ours.tokenizer.get_vocab()  # two vectors: the token and its second part
    assert np.abs(mine - sample(ours, "a photo")).max() > 1e-4


def test_from_single_file_loads_our_class_to_the_same_images(tiny_dir, tmp_path):
    path = save_single_file(tiny_dir, tmp_path / "model.safetensors")
    loaded = LatentDiffusionPipeline.from_single_file(str(path), config=str(tiny_dir), local_files_only=True)
    assert isinstance(loaded, LatentDiffusionPipeline)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded), _run(LatentDiffusionPipeline.from_pretrained(tiny_dir)), atol=1e-4)


def test_the_long_prompt_warning_follows_diffusers_verbosity():
    before = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_error()
        assert not pipeline_logger.isEnabledFor(diffusers_logging.WARNING)
        diffusers_logging.set_verbosity_warning()
        assert pipeline_logger.isEnabledFor(diffusers_logging.WARNING)
    finally:
        diffusers_logging.set_verbosity(before)
