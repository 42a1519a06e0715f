"""The built-in emoji dataset on a handful of emoji: names, skin tones, rendering, the cache, the licence."""

import numpy as np
import pytest
import torch
from ldm_pipeline.training.config import ConfigError, config_from_dict
from transformers import CLIPConfig, CLIPModel

from ldm_pipeline.data import emoji as emoji_data
from ldm_pipeline.data.emoji import emoji_records, held_out_pairs, make_emoji, render
from ldm_pipeline.evaluation import emoji as emoji_eval
from ldm_pipeline.evaluation.emoji import r_precision
from ldm_pipeline.presets import get_preset, text_config, vision_config
from ldm_pipeline.tokenizer import load_clip_tokenizer

CODES = ["1F44B", "1F44B-1F3FB", "1F44B-1F3FD", "1F1E9-1F1EA", "0023-FE0F-20E3", "1F468-1F3FD-200D-1F9B0"]


def test_names_bases_and_skin_tones_come_from_the_code_points():
    records, unnamed = emoji_records(CODES)
    by_code = {r.code: r for r in records}
    assert unnamed == [] and set(by_code) == set(CODES)
    assert by_code["1F44B"].name == "waving hand" and by_code["1F44B"].skin_tone is None
    medium = by_code["1F44B-1F3FD"]
    assert (medium.name, medium.base, medium.skin_tone) == (
        "waving hand, medium skin tone",
        "waving hand",
        "medium skin tone",
    )
    assert by_code["1F1E9-1F1EA"].name == "flag of Germany" and by_code["0023-FE0F-20E3"].name == "keycap #"
    assert by_code["1F468-1F3FD-200D-1F9B0"].base == "man red hair"
    with pytest.raises(ValueError, match="has no emoji"):
        emoji_records(["FFFFF"])


def test_every_emoji_is_rendered_on_white_with_its_tones_colour():
    light, medium = (np.asarray(render(code, 32)) for code in ("1F44B-1F3FB", "1F44B-1F3FD"))
    assert light.shape == (32, 32, 3) and (light[0, 0] == 255).all() and (medium[-1, -1] == 255).all()

    # OpenMoji draws each tone in one fixed colour: the most common non-white colour of the hand.
    def skin(a):
        colours, counts = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
        return tuple(colours[np.argsort(-counts)[1]])

    assert skin(light) == (250, 220, 188) and skin(medium) == (193, 154, 101)


def test_make_emoji_renders_once_and_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path))
    ds = make_emoji(resolution=16, seed=1, codes=CODES)
    assert len(ds) == len(CODES) and ds[0]["image"].size == (16, 16)
    assert ds.column_names == ["image", "text", "name", "base", "skin_tone", "code"]
    row = ds[ds["code"].index("1F44B-1F3FD")]
    assert sorted(row["text"]) == sorted(t.format(name="waving hand, medium skin tone") for t in emoji_data.TEMPLATES)
    assert len(list((tmp_path / "emoji").glob("*.npz"))) == 1

    def no_render(code, resolution):
        raise AssertionError("rendered again although cached")

    monkeypatch.setattr(emoji_data, "render", no_render)
    again = make_emoji(resolution=16, seed=1, codes=CODES)
    assert np.array_equal(np.asarray(again[2]["image"]), np.asarray(ds[2]["image"]))


def test_the_emoji_recipe_stops_on_both_measures_and_other_data_cannot_ask_for_a_held_out_tone():
    cfg = config_from_dict({"data": {"name": "emoji", "holdout": 8}, "unet": {"eval_every": 100, "target": 0.9}})
    assert cfg.unet.eval_every == 100
    from ldm_pipeline.configs import shipped
    from ldm_pipeline.training.config import load_config

    recipe = load_config(shipped("emoji.yaml")).unet
    assert (recipe.target, recipe.held_out_target, recipe.eval_every) == (0.95, 0.8, 500)
    with pytest.raises(ConfigError, match="held_out_target: the held-out skin tone of the built-in emoji"):
        config_from_dict(
            {"data": {"name": "digits"}, "unet": {"eval_every": 100, "target": 0.9, "held_out_target": 0.8}}
        )


# "OK hand" in five tones: its medium-dark one is a held-out pair.
OK_HAND = ["1F44C", *(f"1F44C-{p:X}" for p in range(0x1F3FB, 0x1F400))]


def test_held_out_pairs_are_never_in_the_training_split():
    held = held_out_pairs()
    assert len(held) == 66 and ("OK hand", "medium-dark skin tone") in held
    assert len({base for base, _ in held}) == 66  # one tone of each chosen emoji
    assert held == held_out_pairs()  # fixed, whatever the run's seed
    splits = {split: set(make_emoji(16, codes=OK_HAND, split=split)["code"]) for split in ("train", "held_out", "all")}
    assert splits["held_out"] == {"1F44C-1F3FE"} and splits["train"] == set(OK_HAND) - {"1F44C-1F3FE"}
    assert splits["all"] == set(OK_HAND)
    with pytest.raises(ValueError, match="emoji split must be one of"):
        make_emoji(16, codes=OK_HAND, split="test")


def test_r_precision_counts_the_own_caption_ranked_first():
    captions = torch.eye(40)
    images = torch.eye(40)[:4].clone()
    images[3] = captions[7]  # the fourth image looks like caption 7, not its own
    assert r_precision(images, captions, own=[0, 1, 2, 3], candidates=32, seed=0) == 0.75


def _few_emoji(tmp_path, monkeypatch):
    """The evaluation's emoji cut to a few (OK hand in five tones, one of them held out, and some
    others), each real image by its prompt, and a seeded tiny CLIP model."""
    monkeypatch.setenv("LDM_CACHE", str(tmp_path))
    subset = [*OK_HAND, "1F44B", "1F600", "1F1E9-1F1EA", *(f"1F44B-{p:X}" for p in range(0x1F3FB, 0x1F400))]
    real = make_emoji(32, codes=subset, split="all")
    by_prompt = {f"an emoji of {n}": im for n, im in zip(real["name"], real["image"], strict=True)}
    monkeypatch.setattr(
        emoji_eval, "make_emoji", lambda resolution, split: make_emoji(resolution, codes=subset, split=split)
    )
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config=text_config(get_preset("tiny")).to_dict(),
            vision_config=vision_config(get_preset("tiny")).to_dict(),
        )
    )
    return by_prompt, clip


def test_the_measures_of_real_images_are_their_ceiling(tmp_path, monkeypatch):
    by_prompt, clip = _few_emoji(tmp_path, monkeypatch)
    report = emoji_eval.emoji_metrics(
        lambda prompts, seed: [by_prompt[p] for p in prompts], clip, load_clip_tokenizer(16), 32, 6, candidates=4
    )
    assert report["prompts"] == 6 and report["held_out_prompts"] == 1
    assert report["r_precision"] == report["r_precision_real"]
    assert report["nearest_top1"] == 1.0 and report["held_out_skin_tone"] == report["real_skin_tone"] == 1.0
    assert report["held_out_emoji_top5"] == 1.0


class _DrawsLike:
    """A stand-in pipeline whose images are given by prompt (the sampler's defaults: none)."""

    default_size = 32
    scheduler = None

    def __init__(self, image_of):
        self.image_of = image_of

    def __call__(self, prompts, generator=None, **kwargs):
        return type("Output", (), {"images": [self.image_of(p) for p in prompts]})


def test_the_emoji_monitor_scores_training_and_held_out_prompts_with_the_runs_clip(tmp_path, monkeypatch):
    import contextlib

    from ldm_pipeline.training.quality import emoji_check

    by_prompt, clip = _few_emoji(tmp_path, monkeypatch)
    clip.save_pretrained(tmp_path / "clip")
    load_clip_tokenizer(16).save_pretrained(tmp_path / "clip")
    asked = []

    def check_with(image_of):
        pipe = _DrawsLike(lambda p: asked.append(p) or image_of(p))
        check = emoji_check(lambda: contextlib.nullcontext(pipe), tmp_path / "clip", 6, 10, 0.9, 0.8, candidates=4)
        return check, check.measure()

    check, faithful = check_with(by_prompt.__getitem__)
    assert check.name == "r_precision" and check.parts == {"held_out_skin_tone": 0.8}
    assert faithful["held_out_skin_tone"] == 1.0  # the real held-out emoji: the asked tone
    held = "an emoji of OK hand, medium-dark skin tone"
    assert held in asked and len(asked) == 7  # six training emoji, then the held-out one
    # Each prompt drawn in the wrong tone (the hand's light variant): no held-out tone is right.
    light = by_prompt["an emoji of OK hand, light skin tone"]
    _, wrong = check_with(lambda p: light if p == held else by_prompt[p])
    assert wrong["held_out_skin_tone"] == 0.0 and wrong["r_precision"] == faithful["r_precision"]
