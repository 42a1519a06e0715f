import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm_pipeline.data import load_builtin, make_shapes
from ldm_pipeline.data.shapes import BACKGROUNDS, COLORS, SHAPES
from ldm_pipeline.evaluation import evaluate, shapes_prompts
from ldm_pipeline.evaluation.metrics import psnr
from ldm_pipeline.evaluation.shapes import adherence, analyse


def _labels(ds):
    return [{k: r[k] for k in ("shape", "color", "background")} for r in ds.remove_columns("image")]


def test_shapes_dataset_is_deterministic_and_labelled():
    a, b, c = make_shapes(20, seed=3), make_shapes(20, seed=3), make_shapes(20, seed=4)
    assert a.column_names == ["image", "text", "shape", "color", "background"]
    assert a["text"] == b["text"] and a["text"] != c["text"]
    assert np.array_equal(np.asarray(a[5]["image"]), np.asarray(b[5]["image"]))
    row = a[0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert row["shape"] in SHAPES and row["color"] in COLORS and row["background"] in BACKGROUNDS
    assert row["shape"] in row["text"] and row["color"] in row["text"] and row["background"] in row["text"]


@pytest.mark.parametrize(("resolution", "blur"), [(32, 1.0), (64, 1.0)])
def test_analyser_reads_real_images(resolution, blur):
    ds = make_shapes(400, seed=11, resolution=resolution)
    labels = _labels(ds)
    assert adherence(list(ds["image"]), labels)["all_correct"] >= 0.99
    rng = np.random.default_rng(0)
    noise = (resolution, resolution, 3)
    noisy = [
        Image.fromarray(np.clip(np.asarray(im, np.float32) + rng.normal(0, 15, noise), 0, 255).astype(np.uint8))
        for im in ds["image"]
    ]
    assert adherence(noisy, labels)["all_correct"] >= 0.99
    blurred = [im.filter(ImageFilter.GaussianBlur(blur)) for im in ds["image"]]
    assert adherence(blurred, labels)["all_correct"] >= 0.97
    shuffled = labels[:]
    random.Random(0).shuffle(shuffled)
    assert adherence(list(ds["image"]), shuffled)["all_correct"] < 0.1
    blank = analyse(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert blank == {"shape": None, "color": None, "background": "white"}


def test_digits_dataset():
    ds = load_builtin("digits", resolution=32)
    assert len(ds) == 5000 and set(ds["digit"]) == set(range(10))
    assert ds[0]["image"].size == (32, 32)
    some = load_builtin("digits", num_samples=50, resolution=64)
    assert len(some) == 50 and len(set(some["digit"])) > 5 and some[0]["image"].size == (64, 64)
    assert str(some[0]["digit"]) in some[0]["text"] or some[0]["text"].split()[-1].isalpha()


def test_psnr_by_hand():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


def test_evaluate_report_keys(pipe):
    report, images = evaluate(pipe, "shapes", num_samples=4, num_inference_steps=2)
    assert len(images) == 4
    parts = [report[k] for k in ("color_accuracy", "shape_accuracy", "background_accuracy")]
    # Shares of 4 images; an image is all-correct only if each part is.
    assert all(v * 4 == round(v * 4) for v in [report["all_correct"], *parts])
    assert report["all_correct"] <= min(parts)
    assert report["clip_score"] is None and 5 < report["psnr"] < 60
    prompts, labels = shapes_prompts(4, 0)
    assert prompts == shapes_prompts(4, 0)[0] and all(lab["shape"] in p for p, lab in zip(prompts, labels, strict=True))
