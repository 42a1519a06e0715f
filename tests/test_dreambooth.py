"""DreamBooth with prior preservation, loss masks and caption variation, on the tiny model."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from ldm_pipeline.training.config import ConfigError, config_from_dict, geometry
from ldm_pipeline.training.data import load_images
from ldm_pipeline.training.run import train
from ldm_pipeline.training.unet import DenoisingLoss, build_caches, frozen_parts, sampling_scheduler
from PIL import Image

from ldm_pipeline.data.prepare import scan
from ldm_pipeline.data.sources import load_source


def _subject(folder, n=4, captions=None):
    """``n`` 32x32 images of one pattern (a checkerboard), captioned only where ``captions`` says."""
    folder.mkdir(parents=True, exist_ok=True)
    board = (np.indices((32, 32)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    for i in range(n):
        Image.fromarray(np.stack([np.roll(board, i, axis=1)] * 3, -1)).save(folder / f"s{i}.png")
        if captions:
            (folder / f"s{i}.txt").write_text(captions[i])
    return folder


def _config(tiny_dir, source, cache, **unet):
    return config_from_dict(
        {
            "model": "tiny",
            "pretrained": str(tiny_dir),
            "stages": ["unet"],
            "report_to": "none",
            "data": {"source": str(source), "cache_dir": str(cache)},
            "unet": {"steps": 2, "batch_size": 2, "learning_rate": 0.01, "checkpoint_every": None, **unet},
        }
    )


DB = {"instance_prompt": "a photo of sks pattern", "class_prompt": "a photo of a pattern", "num_class_images": 4}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, {"rank": 4}])
def test_prior_preservation_draws_class_images_once_and_reports_the_prior_loss(tiny_dir, tmp_path, lora):
    source = _subject(tmp_path / "subject")
    db = {**DB, "class_sampling_steps": 2}
    report = train(_config(tiny_dir, source, tmp_path / "cache", dreambooth=db, lora=lora), tmp_path / "a")["unet"]
    drawn = report["class_images"]
    assert (drawn["count"], drawn["generated"], drawn["reused"]) == (4, 4, 0)
    files = sorted((tmp_path / "cache").glob("class-images-*/class-*.png"))
    assert len(files) == 4 and all(Image.open(f).size == (32, 32) for f in files)
    assert report["final_prior_loss"] > 0 and report["final_instance_loss"] > 0
    assert report["images"] == 4  # captionless images took the instance prompt instead of being skipped
    stamps = [f.stat().st_mtime_ns for f in files]

    again = train(_config(tiny_dir, source, tmp_path / "cache", dreambooth=db, lora=lora), tmp_path / "b")["unet"]
    assert (again["class_images"]["generated"], again["class_images"]["reused"]) == (0, 4)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again["final_loss"] == report["final_loss"]  # the same class images, the same training

    other = {**db, "class_prompt": "a photo of a square"}
    moved = train(_config(tiny_dir, source, tmp_path / "cache", dreambooth=other, lora=lora), tmp_path / "c")["unet"]
    assert moved["class_images"]["generated"] == 4 and moved["class_images"]["folder"] != drawn["folder"]


@pytest.mark.slow
def test_own_class_images_are_topped_up_and_a_broken_one_is_reported(tiny_dir, tmp_path):
    source = _subject(tmp_path / "subject")
    own = _subject(tmp_path / "class", n=2)
    (own / "broken.png").write_bytes(b"not a png")
    db = {**DB, "class_sampling_steps": 2, "class_data_dir": str(own)}
    report = train(_config(tiny_dir, source, tmp_path / "cache", dreambooth=db), tmp_path / "run")["unet"]
    drawn = report["class_images"]
    assert (drawn["count"], drawn["generated"], drawn["reused"]) == (4, 2, 2)
    assert len(drawn["unreadable"]) == 1 and "broken.png" in drawn["unreadable"][0]


def test_class_images_of_several_prompts_are_drawn_in_turn_and_captioned_by_their_own(tiny_dir, tmp_path):
    from ldm_pipeline.training.dreambooth import class_images

    own = _subject(tmp_path / "class", n=2, captions=["a photo of a stripe", ""])
    prompts = ["a photo of a circle", "a photo of a square"]
    db = {**DB, "class_prompt": prompts, "num_class_images": 5, "class_sampling_steps": 1, "class_data_dir": str(own)}
    cfg = _config(tiny_dir, _subject(tmp_path / "subject"), tmp_path / "cache", dreambooth=db)
    parts = frozen_parts(cfg, tmp_path / "run")
    drawn = class_images(cfg, parts, sampling_scheduler(cfg), tmp_path / "run", Accelerator(cpu=True))
    assert (drawn.generated, drawn.reused) == (3, 2)
    (pixels,) = drawn.images.buckets
    # Own images: their .txt, else the first class prompt; drawn image k: prompt k mod 2, written beside it.
    expected = [prompts[0], prompts[1], prompts[0], "a photo of a stripe", prompts[0]]
    assert [c for (c,) in pixels.captions] == expected
    written = {p.stem: p.read_text().strip() for p in own.glob("class-*.txt")}
    assert written == {"class-00000": prompts[0], "class-00001": prompts[1], "class-00002": prompts[0]}
    assert not list(own.glob(".*tmp*"))
    again = class_images(cfg, parts, sampling_scheduler(cfg), tmp_path / "run", Accelerator(cpu=True))
    assert (again.generated, again.reused) == (0, 5) and again.images.buckets[0].captions == pixels.captions


def test_dreambooth_config_errors_name_the_key(tmp_path):
    base = {"pretrained": "x", "data": {"source": "y"}}
    cases = [
        ({**base, "unet": {"dreambooth": {"instance_prompt": " "}}}, "instance_prompt: must name your subject"),
        ({"data": {"source": "y"}, "unet": {"dreambooth": {"instance_prompt": "sks"}}}, "fine-tunes a trained model"),
        ({"pretrained": "x", "unet": {"dreambooth": {"instance_prompt": "sks"}}}, "needs data.source"),
        ({**base, "unet": {"dreambooth": {"instance_prompt": "sks", "prior_loss_weight": -1}}}, "prior_loss_weight"),
        ({"unet": {"masked_loss": True}}, "masked_loss: needs data.source"),
        ({**base, "unet": {"dreambooth": {"instance_prompt": "sks", "class_prompt": []}}}, "class_prompt: empty"),
        (
            {**base, "unet": {"dreambooth": {"instance_prompt": "sks", "class_prompt": ["a", " "]}}},
            "class_prompt: empty",
        ),
        ({**base, "unet": {"dreambooth": {"instance_prompt": "sks", "class_prompt": [3]}}}, "class_prompt"),
        ({**base, "unet": {"dreambooth": {"instance_prompt": "sks", "prior_target": "model"}}}, "needs class_prompt"),
        (
            {**base, "unet": {"train_text_encoder": True, "dreambooth": {**DB, "prior_target": "model"}}},
            "prior_target: model needs train_text_encoder false",
        ),
        ({**base, "unet": {"dreambooth": {**DB, "prior_target": "teacher"}}}, "prior_target"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw, resolved=False)


def _masked_folder(folder):
    """Four random images, each with a mask black on its left half, and one with a broken mask."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"m{i}.png")
        (folder / f"m{i}.txt").write_text(f"a photo number {i}")
        Image.fromarray(mask).save(folder / f"m{i}_mask.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "bad.png")
    (folder / "bad.txt").write_text("a photo")
    (folder / "bad_mask.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a photo")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(folder / "wide_mask.png")
    return folder


def test_masks_are_found_beside_their_images_and_broken_ones_skip_only_their_image(tmp_path):
    folder = _masked_folder(tmp_path / "data")
    found = scan(load_source(folder), progress=False, masks=True)
    assert len(found.rows) == 4 and found.masked == 4  # the *_mask.png files are not training images
    reasons = {s.item.rsplit("/", 1)[-1]: s.reason for s in found.skipped}
    assert set(reasons) == {"bad.png", "wide.png"}
    assert reasons["bad.png"].startswith("unusable loss mask") and "another aspect ratio" in reasons["wide.png"]
    assert "4 with a loss mask" in found.summary()
    assert len(scan(load_source(folder), progress=False).rows) == 6  # without masked_loss masks are not read


def test_a_table_names_its_masks_in_a_column(tmp_path):
    folder = _masked_folder(tmp_path / "data")
    rows = [{"file_name": f"m{i}.png", "text": "x", "mask": f"m{i}_mask.png" if i else ""} for i in range(4)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = scan(load_source(folder / "pairs.jsonl", mask_column="mask"), progress=False, masks=True)
    assert len(found.rows) == 4 and found.masked == 4  # m0 has no cell: its same-name file is used


@pytest.mark.parametrize("crop", ["center", "random"])
def test_the_mask_is_cropped_with_its_image(tmp_path, crop):
    folder = tmp_path / "data"
    folder.mkdir()
    gradient = np.tile(np.arange(0, 240, 5, dtype=np.uint8), (32, 1))  # 32 x 48, brighter to the right
    Image.fromarray(np.stack([gradient] * 3, -1)).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    Image.fromarray(gradient).save(folder / "a_mask.png")  # the mask is the image's own brightness
    cfg = config_from_dict(
        {"data": {"source": str(folder), "crop": crop, "resolution": 32, "holdout": 0}}, resolved=False
    )
    train_set, _ = load_images(cfg.data, 8, 1, masks=True)
    pixels = train_set.buckets[0]
    assert pixels.masks.shape == (1, 1, 32, 32)
    assert torch.equal(pixels.masks[0, 0], pixels.images[0, 0])


class _Recorder(torch.nn.Module):
    """The UNet, keeping each output so that the test can read the loss's gradient on it."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.outputs = unet, []

    def forward(self, zt, t, cond):
        out = self.unet(zt, t, encoder_hidden_states=cond).sample
        out.retain_grad()
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("masked", [True, False])
def test_a_black_mask_zeroes_the_loss_gradient_there(tiny_dir, tmp_path, masked):
    folder = _masked_folder(tmp_path / "data")
    cfg = _config(tiny_dir, folder, tmp_path / "cache", masked_loss=masked, caption_dropout=0.0)
    cfg.data.max_skipped_fraction = 0.5  # the folder's two broken masks
    train_set, _ = load_images(cfg.data, geometry(cfg).bucket_step, 2, masks=masked)
    accelerator = Accelerator(cpu=True)
    parts = frozen_parts(cfg, tmp_path)
    caches = build_caches(cfg, train_set, parts, tmp_path, accelerator)
    model = _Recorder(UNet2DConditionModel.from_pretrained(tiny_dir / "unet"))
    loss = DenoisingLoss(cfg, caches, parts, model, sampling_scheduler(cfg), accelerator)
    loss(0)["loss"].backward()
    grad = model.outputs[0].grad
    half = grad.shape[-1] // 2
    assert grad[..., half:].abs().min() > 0
    if masked:
        assert grad[..., :half].abs().max() == 0
    else:
        assert grad[..., :half].abs().min() > 0


class _Teacher(torch.nn.Module):
    """The untuned UNet, recording the conditions it is asked about."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.conds = unet, []

    def forward(self, zt, t, cond):
        self.conds.append(cond)
        return self.unet(zt, t, encoder_hidden_states=cond).sample


def test_prior_target_model_regresses_onto_the_untuned_unet_for_class_and_subject_images(tiny_dir, tmp_path):
    from ldm_pipeline.training.dreambooth import class_images

    own = _subject(tmp_path / "class", n=2, captions=["a photo of a pattern", "a photo of a stripe"])
    db = {**DB, "num_class_images": 2, "class_data_dir": str(own), "prior_target": "model"}
    cfg = _config(tiny_dir, _subject(tmp_path / "subject"), tmp_path / "cache", dreambooth=db, caption_dropout=0.0)
    train_set, _ = load_images(cfg.data, geometry(cfg).bucket_step, 2, default_caption=DB["instance_prompt"])
    accelerator = Accelerator(cpu=True)
    parts, sampler = frozen_parts(cfg, tmp_path), sampling_scheduler(cfg)
    prior = class_images(cfg, parts, sampler, tmp_path, accelerator).images
    caches = build_caches(cfg, train_set, parts, tmp_path, accelerator, prior)
    student = _Recorder(UNet2DConditionModel.from_pretrained(tiny_dir / "unet"))
    teacher = _Teacher(UNet2DConditionModel.from_pretrained(tiny_dir / "unet").requires_grad_(False))
    loss = DenoisingLoss(cfg, caches, parts, student, sampler, accelerator, prior, teacher)

    terms = loss(0)
    # The untuned weights predict what the untuned UNet does: no prior loss, and no gradient from it.
    assert terms["prior_loss"] == 0 and terms["instance_loss"] > 0
    terms["loss"].backward()
    instance_out, class_out, anchor_out = student.outputs
    assert instance_out.grad.abs().max() > 0
    assert class_out.grad.abs().max() == 0 and anchor_out.grad.abs().max() == 0
    # Asked about the class images under their captions, then the subject's under the first class prompt.
    embed = loss.embed
    assert torch.equal(teacher.conds[0], embed(["a photo of a pattern", "a photo of a stripe"]))
    assert torch.equal(teacher.conds[1], embed([DB["class_prompt"]] * 2))

    with torch.no_grad():
        for param in student.unet.parameters():
            param.add_(0.01 * torch.randn_like(param))
    assert loss(1)["prior_loss"] > 0  # moved weights: a prior loss pulls them back


@pytest.mark.slow
def test_prior_target_model_trains_end_to_end(tiny_dir, tmp_path):
    db = {**DB, "class_sampling_steps": 2, "prior_target": "model"}
    cfg = _config(tiny_dir, _subject(tmp_path / "subject"), tmp_path / "cache", dreambooth=db, steps=12)
    report = train(cfg, tmp_path / "a")
    # Zero at the first step (untuned weights); by the step-10 log the weights have moved.
    assert report["unet"]["final_prior_loss"] > 0 and report["unet"]["class_images"]["generated"] == 4
    assert (tmp_path / "a" / "pipeline" / "unet").is_dir()


@pytest.mark.slow
def test_shuffled_tags_train_and_count_the_captions_encoded_in_the_loop(tiny_dir, tmp_path):
    tags = ["sks, red, round, small", "sks, blue, round, big", "sks, red, square, big", "sks, green, tall, thin"]
    source = _subject(tmp_path / "subject", captions=tags)
    cfg = _config(tiny_dir, source, tmp_path / "cache", shuffle_tags=True, keep_tokens=1, tag_dropout=0.2, steps=4)
    report = train(cfg, tmp_path / "run")["unet"]
    assert 0 < report["captions_encoded_in_loop"] <= 8


@pytest.mark.slow
def test_fine_tuning_validation_shows_the_base_model_beside_the_current_weights(tiny_dir, tmp_path):
    source = _subject(tmp_path / "subject", captions=["a", "b", "c", "d"])
    prompts = ["a photo number 1", "a photo number 2", "a photo number 3"]
    cfg = _config(tiny_dir, source, tmp_path / "cache", validation_every_steps=2, validation_prompts=prompts, steps=4)
    train(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "validation"
    base = [np.asarray(Image.open(folder / "base" / f"{i:02d}.png")) for i in range(3)]
    for step in (2, 4):
        grid = np.asarray(Image.open(folder / f"unet-step{step:06d}.png"))
        assert grid.shape == (64, 96, 3)  # two rows (base, current) of three 32 px images
        np.testing.assert_array_equal(grid[:32], np.concatenate(base, axis=1))
    current = np.asarray(Image.open(folder / "unet-step000004.png"))[32:]
    assert np.abs(current.astype(int) - np.concatenate(base, axis=1)).max() > 0  # training moved the weights
