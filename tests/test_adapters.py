"""Files other tools load: the single-file checkpoint, kohya-layout LoRAs, DoRA; LoHa/LoKr refused."""

import tempfile

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from ldm_pipeline.training.config import ConfigError, config_from_dict
from ldm_pipeline.training.run import train
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_pipeline import LatentDiffusionPipeline, build_pipeline
from ldm_pipeline.cli import main
from ldm_pipeline.errors import InputError
from ldm_pipeline.formats import kohya_lora_state_dict, save_single_file, unet_to_ldm


def _images(pipe, prompt="a photo number 3"):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, guidance_scale=2.5, generator=generator, output_type="np").images


def _stock(folder):
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text(f"a photo number {i}")
    return folder


def _train_lora(tiny_dir, folder, out, **lora):
    cfg = config_from_dict(
        {
            "model": "tiny",
            "pretrained": str(tiny_dir),
            "stages": ["unet"],
            "report_to": "none",
            "data": {"source": str(folder)},
            "unet": {
                "steps": 3,
                "batch_size": 2,
                "learning_rate": 0.05,
                "train_text_encoder": True,
                "lora": {"rank": 4, "alpha": 8, **lora},
            },
        }
    )
    train(cfg, out)
    return out / "lora"


def test_single_file_loads_in_stock_diffusers_to_the_same_images(tiny_dir, tmp_path):
    path = tmp_path / "model.safetensors"
    assert main(["export", "--format", "single-file", "--model", str(tiny_dir), "--output", str(path)]) == 0
    keys = load_file(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    stock = StableDiffusionPipeline.from_single_file(
        path, config=str(tiny_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    ours = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    np.testing.assert_allclose(_images(stock), _images(ours), atol=1e-4)
    half = tmp_path / "half.safetensors"
    save_single_file(tiny_dir, half, "fp16")
    assert all(v.dtype == torch.float16 for v in load_file(half).values())


def test_single_file_numbers_an_sd15_shaped_unet_as_the_original_checkpoints_do():
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    keys = set(unet_to_ldm(unet.state_dict(), unet.config))
    # Key names of the original SD 1.x checkpoints (v1-5-pruned.safetensors), one per kind of block.
    for key in (
        "input_blocks.0.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "output_blocks.3.0.skip_connection.weight",
        "time_embed.2.weight",
        "out.2.weight",
    ):
        assert key in keys, key
    assert len(keys) == len(unet.state_dict())


def test_single_file_export_refuses_bad_arguments(tiny_dir, tmp_path, capsys):
    assert main(["export", "--format", "single-file", "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert (
        main(["export", "--format", "single-file", "--model", str(tiny_dir), "--output", str(tmp_path / "m.ckpt")]) == 2
    )
    assert ".safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists()


@pytest.mark.slow
def test_kohya_lora_loads_in_stock_diffusers_to_the_same_images(tiny_dir, folder, tmp_path):
    lora = _train_lora(tiny_dir, folder, tmp_path / "run")
    path = tmp_path / "kohya.safetensors"
    assert main(["export", "--format", "kohya", "--lora", str(lora), "--output", str(path)]) == 0
    keys = load_file(path)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert float(keys["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.alpha"]) == 8.0
    from_folder = _stock(tiny_dir)
    from_folder.load_lora_weights(lora)
    from_kohya = _stock(tiny_dir)
    from_kohya.load_lora_weights(path)
    expected = _images(from_folder)
    np.testing.assert_allclose(_images(from_kohya), expected, atol=1e-4)
    assert np.abs(expected - _images(_stock(tiny_dir))).max() > 1e-3  # the LoRA does change the images


@pytest.mark.slow
def test_dora_trains_saves_and_loads_in_stock_diffusers(tiny_dir, folder, tmp_path, capsys):
    lora = _train_lora(tiny_dir, folder, tmp_path / "run", use_dora=True)
    weights = load_file(lora / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    ours.load_lora_weights(lora)
    stock = _stock(tiny_dir)
    stock.load_lora_weights(lora)
    np.testing.assert_array_equal(_images(stock), _images(ours))
    out = tmp_path / "kohya.safetensors"
    assert main(["export", "--format", "kohya", "--lora", str(lora), "--output", str(out)]) == 2
    assert "not a plain LoRA weight" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_loha_and_lokr_are_refused_with_the_reason(adapter):
    with pytest.raises(ConfigError, match=f"unet.lora.adapter: {adapter} is not supported: diffusers"):
        config_from_dict({"unet": {"lora": {"adapter": adapter}}}, resolved=False)


@pytest.mark.parametrize("peft_config", [LoHaConfig, LoKrConfig])
def test_stock_diffusers_still_refuses_peft_loha_and_lokr_weights(tiny_dir, peft_config):
    """The reason given for refusing them; when diffusers starts loading these, this fails and the
    adapters can be offered."""
    pipe = build_pipeline("tiny")
    config = peft_config(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    inject_adapter_in_model(config, pipe.unet, adapter_name="default")
    with tempfile.TemporaryDirectory() as folder:
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True
        )
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            _stock(tiny_dir).load_lora_weights(folder)


def test_kohya_export_of_a_folder_without_a_lora_fails_clearly(tmp_path, capsys):
    assert (
        main(["export", "--format", "kohya", "--lora", str(tmp_path), "--output", str(tmp_path / "k.safetensors")]) == 2
    )
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.x.hada_w1_a": torch.zeros(2)}, bad)
    with pytest.raises(InputError, match="not a plain LoRA"):
        kohya_lora_state_dict(bad)
