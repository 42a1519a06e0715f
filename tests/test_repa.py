"""Representation alignment (unet.repa): its loss, projector, feature tap, cached encoder features,
and the UNet stage with the term added."""

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from ldm_pipeline.training.config import ConfigError
from ldm_pipeline.training.quickstart import quickstart_config
from ldm_pipeline.training.repa import (
    FeatureTap,
    Projector,
    alignment_loss,
    cached_features,
    patch_features,
    square_grid,
)
from ldm_pipeline.training.run import train
from ldm_pipeline.training.unet import block_channels
from transformers import CLIPVisionConfig, CLIPVisionModel

from ldm_pipeline import build_pipeline
from ldm_pipeline.errors import InputError


def test_the_alignment_loss_is_minus_the_mean_cosine_similarity_per_sample():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [3.0, 0.0]]])  # 2 samples, 2 patches
    b = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 5.0]]])
    # sample 0: both patches point the same way (cos 1, 1); sample 1: opposite (-1), orthogonal (0)
    assert alignment_loss(a, b).tolist() == pytest.approx([-1.0, 0.5])


def test_the_projector_maps_channels_to_the_encoder_width_on_its_patch_grid():
    projector = Projector(channels=6, width=5, hidden=7)
    out = projector(torch.randn(3, 6, 2, 2), (4, 4))
    assert out.shape == (3, 16, 5)
    same = projector(torch.randn(3, 6, 4, 4), (4, 4))  # already on the grid: no resizing
    assert same.shape == (3, 16, 5)
    assert square_grid(16) == (4, 4)
    with pytest.raises(InputError, match="not a square grid"):
        square_grid(12)


@pytest.mark.parametrize("block", ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"])
def test_the_tap_keeps_the_block_output_whose_channels_the_projector_expects(block):
    unet = build_pipeline("tiny").unet
    tap = FeatureTap(unet, block)
    latents = torch.randn(2, unet.config.in_channels, 8, 8)
    text = torch.randn(2, 4, unet.config.cross_attention_dim)
    unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text)
    features = tap.take()
    assert features.shape[:2] == (2, block_channels(unet, block))
    with pytest.raises(RuntimeError, match="did not run"):
        tap.take()  # taken once: a stale map is never reused


def test_a_block_the_unet_does_not_have_is_named():
    unet = build_pipeline("tiny").unet
    with pytest.raises(InputError, match="down_blocks.7"):
        block_channels(unet, "down_blocks.7")
    with pytest.raises(InputError, match="no module"):
        FeatureTap(unet, "up_blocks.9")


class _Images:
    """A bucket of images in [-1, 1] as `training.data.Pixels` serves them."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def float_batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]


def test_cached_features_are_the_patch_tokens_of_each_image_and_of_its_mirror():
    torch.manual_seed(0)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    cache = cached_features(encoder, _Images(images), layer=-1, flip=True, batch_size=2)
    assert cache["features"].shape == (5, 16, 16)  # 4x4 patches, no class token
    hidden = encoder(pixel_values=_clip_pixels(images), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(cache["features"], hidden[:, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache["features_flipped"], patch_features(encoder, images.flip(-1)))
    assert not torch.allclose(cache["features_flipped"], cache["features"])
    assert "features_flipped" not in cached_features(encoder, _Images(images), layer=1, flip=False)


def _clip_pixels(images: torch.Tensor) -> torch.Tensor:
    from ldm_pipeline.evaluation.metrics import clip_pixel_values

    return clip_pixel_values(images)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A smoke run's VAE, CLIP model and text encoder (stages vae and clip)."""
    out = tmp_path_factory.mktemp("repa")
    train(quickstart_config(smoke=True, overrides=["data.random_flip=true"]), out, stages=["vae", "clip"])
    return out


def _unet_run(clip_run, folder, overrides):
    for part in ("vae", "clip", "text_encoder", "tokenizer"):
        (folder / part).symlink_to(clip_run / part)
    cfg = quickstart_config(smoke=True, overrides=["data.random_flip=true", "unet.steps=1", *overrides])
    report = train(cfg, folder, stages=["unet"])
    return report, json.loads((folder / "logs" / "unet_losses.json").read_text())["losses"]


def test_the_alignment_term_enters_the_loss_with_its_weight(clip_run, tmp_path):
    logged = {}
    for weight in (0.5, 1.5):
        folder = tmp_path / str(weight)
        folder.mkdir()
        _, losses = _unet_run(clip_run, folder, [f"unet.repa.weight={weight}"])
        logged[weight] = losses[0]
    # step 1: the same weights, draws and features, so only the weighted term differs
    assert logged[0.5]["alignment_loss"] == pytest.approx(logged[1.5]["alignment_loss"], abs=1e-6)
    alignment = logged[0.5]["alignment_loss"]
    assert -1 <= alignment <= 1 and alignment != 0
    assert logged[1.5]["loss"] - logged[0.5]["loss"] == pytest.approx(1.0 * alignment, abs=1e-5)
    plain = tmp_path / "plain"
    plain.mkdir()
    _, losses = _unet_run(clip_run, plain, [])
    assert "alignment_loss" not in losses[0]
    assert losses[0]["loss"] == pytest.approx(logged[0.5]["loss"] - 0.5 * alignment, abs=1e-5)


def test_a_repa_run_saves_a_stock_unet_and_aligns_to_a_named_encoder(clip_run, tmp_path):
    report, losses = _unet_run(clip_run, tmp_path, ["unet.repa.block=down_blocks.1", f"unet.repa.encoder={clip_run}"])
    assert report["unet"]["steps"] == 1 and math.isfinite(losses[-1]["alignment_loss"])
    UNet2DConditionModel.from_pretrained(tmp_path / "pipeline", subfolder="unet")  # no projector keys: loads strictly


def test_repa_without_a_clip_model_says_where_to_find_one(tmp_path, clip_run):
    for part in ("vae", "text_encoder", "tokenizer"):
        (tmp_path / part).symlink_to(clip_run / part)
    cfg = quickstart_config(smoke=True, overrides=["unet.repa.weight=0.5", "unet.steps=1"])
    with pytest.raises(InputError, match="clip.*does not exist.*unet.repa.encoder"):
        train(cfg, tmp_path, stages=["unet"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["unet.repa.block=middle"], "unet.repa.block"),
        (["unet.repa.weight=0"], "unet.repa.weight"),
        (["unet.repa.projector_dim=-3"], "unet.repa.projector_dim"),
        (["unet.repa.weight=1", "clip.pretrained=some/clip"], "unet.repa.encoder"),
        (["unet.repa.weight=1", "data.source=/somewhere"], "in memory"),
    ],
)
def test_repa_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        quickstart_config(smoke=True, overrides=overrides)
