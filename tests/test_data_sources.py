"""User data: every source kind, robust decoding with a skip report, aspect buckets, ``ldm data check``."""

import io
import json

import datasets
import pytest
import torch
from ldm_pipeline.training.data import Pixels, bucket_batches
from PIL import Image

from ldm_pipeline.cli import main
from ldm_pipeline.data.buckets import fit_to_bucket, make_buckets, nearest_bucket
from ldm_pipeline.data.decode import SkippedImage, decode_image
from ldm_pipeline.data.prepare import assign_buckets, prepare_images, scan
from ldm_pipeline.data.sources import SourceError, load_source


def _png(path, size=(12, 8), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def _captions(ds):
    return sorted(str(t) for t in ds["text"])


def test_imagefolder_with_metadata_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for i in range(3):
        _png(jsonl / f"{i}.png")
    (jsonl / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"cap {i}"}) + "\n" for i in range(3))
    )
    ds = load_source(jsonl)
    assert ds.column_names == ["image", "text", "skip"] and _captions(ds) == ["cap 0", "cap 1", "cap 2"]
    assert decode_image(ds[0]["image"]).size == (12, 8)

    csv = tmp_path / "csv"
    csv.mkdir()
    for i in range(2):
        _png(csv / f"{i}.png")
    (csv / "metadata.csv").write_text("file_name,description\n0.png,first\n1.png,second\n")
    assert _captions(load_source(csv, caption_column="description")) == ["first", "second"]
    with pytest.raises(SourceError, match="no caption column 'missing'"):
        load_source(csv, caption_column="missing")


def test_unlisted_images_in_an_imagefolder_are_reported_not_dropped(tmp_path):
    _png(tmp_path / "listed.png")
    _png(tmp_path / "unlisted.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "listed.png", "text": "a"}) + "\n")
    found = scan(load_source(tmp_path), progress=False)
    assert found.total == 2 and len(found.rows) == 1
    assert [s.item.endswith("unlisted.png") and s.reason.startswith("no caption") for s in found.skipped] == [True]


def test_folder_with_txt_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a", "sub/b", "c"):
        _png(tmp_path / f"{name}.jpg")
    (tmp_path / "a.txt").write_text("an apple\n")
    (tmp_path / "sub" / "b.txt").write_text("a banana")
    ds = load_source(tmp_path)
    assert len(ds) == 3 and sorted(map(str, ds["text"])) == ["None", "a banana", "an apple"]
    found = scan(ds, progress=False)
    assert len(found.rows) == 2 and found.skipped[0].item.endswith("c.jpg")


def test_csv_and_jsonl_tables_with_relative_paths_and_several_captions(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        _png(tmp_path / "img" / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("path,caption\nimg/0.png,zero\nimg/1.png,one\n")
    ds = load_source(tmp_path / "pairs.csv")
    assert _captions(ds) == ["one", "zero"] and decode_image(ds[1]["image"]).size == (12, 8)

    rows = [{"image": "img/0.png", "text": ["a red one", "a crimson one"]}, {"image": "img/1.png", "text": "b"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = scan(load_source(tmp_path / "pairs.jsonl"), progress=False)
    assert sorted(map(sorted, found.captions)) == [["a crimson one", "a red one"], ["b"]]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": ["x", "y", "z"]}).cast_column(
        "image", datasets.Image()
    )
    ds.save_to_disk(tmp_path / "flat")
    loaded = load_source(tmp_path / "flat")
    assert _captions(loaded) == ["x", "y", "z"]
    assert decode_image(loaded[2]["image"]).getpixel((0, 0)) == (80, 0, 0)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dict")
    assert len(load_source(tmp_path / "dict", split="test")) == 1
    with pytest.raises(SourceError, match="no split 'valid'"):
        load_source(tmp_path / "dict", split="valid")


def test_missing_sources_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="data source not found"):
        load_source(str(tmp_path / "nowhere" / "deeper"))
    with pytest.raises(SourceError, match="no image files"):
        load_source(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="a file source must be one of"):
        load_source(tmp_path / "notes.txt")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_decoding_converts_every_mode_to_rgb():
    # EXIF orientation 6: stored 12 wide and 8 high, shown rotated to 8 x 12.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(_encoded(Image.new("RGB", (12, 8)), "JPEG", exif=exif.tobytes()))
    assert rotated.size == (8, 12)
    cmyk = decode_image(_encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 240 and cmyk.getpixel((0, 0))[1] < 15
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(_encoded(clear, "PNG"), background=(0, 0, 255)).getpixel((0, 0)) == (0, 0, 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert decode_image(_encoded(half, "PNG")).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.info["transparency"] = 0
    assert decode_image(_encoded(palette, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4), 65535)
    assert decode_image(_encoded(deep, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    floats = Image.new("F", (4, 4), 0.5)
    assert decode_image(_encoded(floats, "TIFF")).getpixel((0, 0)) == (128, 128, 128)


def _broken_folder(folder, good: int = 8):
    """``good`` fine images plus one broken file of each kind, all captioned."""
    folder.mkdir()
    for i in range(good):
        _png(folder / f"good{i}.png", size=(16 + 4 * (i % 3), 16), color=(i * 30, 100, 50))
    full = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    broken = {
        "truncated.png": full[: len(full) // 2],
        "zero.png": b"",
        "text.png": b"this is not an image",
        "bomb.png": _encoded(Image.new("L", (5000, 5000)), "PNG"),
    }
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    for path in folder.glob("*.png"):
        path.with_suffix(".txt").write_text(f"picture {path.stem}")
    return {
        "truncated.png": "truncated",
        "zero.png": "zero-byte",
        "text.png": "not an image",
        "bomb.png": "pixel limit",
    }


def test_each_broken_file_is_skipped_with_its_reason(tmp_path):
    expected = _broken_folder(tmp_path / "data")
    found = scan(load_source(tmp_path / "data"), max_pixels=1_000_000, progress=False)
    reasons = {s.item.rsplit("/", 1)[-1]: s.reason for s in found.skipped}
    assert set(reasons) == set(expected)
    for name, phrase in expected.items():
        assert phrase in reasons[name], (name, reasons[name])
    assert len(found.rows) == 8 and "8 of 12 images usable, 4 skipped" in found.summary()
    with pytest.raises(SkippedImage, match="file not found"):
        decode_image(str(tmp_path / "gone.png"))


def _reasons(found):
    return sorted(s.reason.split(" (")[0] for s in found.skipped)


def test_a_caption_file_that_is_not_utf8_skips_only_its_image(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"picture {name}")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait")
    found = scan(load_source(tmp_path), progress=False)
    assert len(found.rows) == 2 and [s.item.rsplit("/", 1)[-1] for s in found.skipped] == ["b.png"]
    assert found.skipped[0].reason == "caption file not UTF-8: b.txt (byte 0xe9 at 3)"


def test_bad_rows_of_a_metadata_file_are_skipped_and_reported(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _png(data / f"{i}.png")
    _png(tmp_path / "outside.png")  # a readable image: used if the path were followed
    lines = [
        json.dumps({"file_name": "0.png", "text": "kept"}),
        json.dumps({"file_name": "../outside.png", "text": "climbs out"}),
        json.dumps({"file_name": str(tmp_path / "outside.png"), "text": "absolute, outside"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"file_name": 7, "text": "a number"}),
    ]
    (data / "metadata.jsonl").write_bytes(
        "\n".join(lines).encode()
        + b'\n{"file_name": "1.png", "text": "caf\xe9"}\n'
        + json.dumps({"file_name": "2.png", "text": "also kept"}).encode()
        + b"\n"
    )
    found = scan(load_source(data), progress=False)
    assert sorted(c for caps in found.captions for c in caps) == ["also kept", "kept"]
    assert _reasons(found) == [
        "bad table row: a JSON list, not an object",
        "bad table row: not valid JSON",
        "bad table row: text that is not UTF-8",
        "no caption",  # 1.png: its row was refused, so no row lists it
        "no image path: got 7",
        "path outside the data folder: ../outside.png",
        f"path outside the data folder: {tmp_path / 'outside.png'}",
    ]
    assert "(metadata.jsonl line 2)" in found.skipped[0].reason


def test_bad_rows_of_a_csv_table_are_skipped_and_a_table_that_cannot_be_read_names_itself(tmp_path):
    _png(tmp_path / "0.png")
    _png(tmp_path / "1.png")
    (tmp_path / "pairs.csv").write_bytes(b'path,caption\n0.png,zero\n1.png,one,stray\n"1.png","caf\xe9"\n1.png,\n')
    found = scan(load_source(tmp_path / "pairs.csv"), progress=False)
    assert found.captions == [["zero"]] and _reasons(found) == [
        "bad table row: 3 fields where the header has 2",
        "bad table row: text that is not UTF-8",
        "no caption",
    ]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match="empty.csv: empty CSV file"):
        load_source(tmp_path / "empty.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match="broken.parquet: not a readable Parquet file"):
        load_source(tmp_path / "broken.parquet")
    (tmp_path / "array.json").write_text('[{"path": "0.png", "caption": "a"}, 3')
    with pytest.raises(SourceError, match="array.json: not valid JSON at line 1"):
        load_source(tmp_path / "array.json")


def test_buckets_cover_the_area_in_multiples_of_the_step():
    buckets = make_buckets(512, 64, max_aspect=2.0)
    assert (512, 512) in buckets and (704, 384) in buckets and (384, 704) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 2.0
        assert abs(w * h - 512 * 512) / (512 * 512) < 0.15
    assert nearest_bucket(1920, 1080, buckets) == (704, 384)
    assert nearest_bucket(1000, 1010, buckets) == (512, 512)


def test_fit_to_bucket_covers_then_crops():
    image = Image.new("RGB", (100, 50))
    image.paste((255, 0, 0), (0, 0, 10, 50))  # a red strip at the left edge
    centre = fit_to_bucket(image, (32, 32), "center")
    assert centre.shape == (32, 32, 3) and centre[:, 0, 0].max() < 50  # the left edge is cropped away
    import random

    crops = {fit_to_bucket(image, (32, 32), "random", random.Random(s))[:, 0, 0].max() > 200 for s in range(20)}
    assert crops == {True, False}  # some random crops keep the left edge, some do not


def test_small_buckets_fold_into_their_neighbours():
    buckets = make_buckets(64, 16, max_aspect=2.0)
    sizes = [(128, 64)] * 5 + [(64, 64)] * 5 + [(60, 64)]  # one image alone near square
    chosen = assign_buckets(sizes, buckets, min_count=4)
    assert set(chosen) == {(96, 48), (64, 64)} and chosen.count((64, 64)) == 6


def test_prepared_buckets_hold_mixed_shapes_and_batches_come_from_one_bucket(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shapes = [(64, 32), (32, 32), (32, 64)]
    for i in range(12):
        _png(folder / f"{i}.png", size=shapes[i % 3])
        (folder / f"{i}.txt").write_text(f"image {i}")
    prepared = prepare_images(load_source(folder), 32, 8, bucketing=True, min_bucket_size=2)
    assert sorted(prepared.groups) == [(24, 48), (32, 32), (48, 24)]
    for (w, h), (arrays, captions) in prepared.groups.items():
        assert arrays.shape == (4, h, w, 3) and len(captions) == 4
    square = prepare_images(load_source(folder), 32, 8, bucketing=False)
    assert list(square.groups) == [(32, 32)] and square.groups[(32, 32)][0].shape == (12, 32, 32, 3)

    draws = bucket_batches([4, 4, 4], 2, seed=0)
    seen = [next(draws) for _ in range(12)]
    assert {b for b, _ in seen} == {0, 1, 2}
    for bucket in range(3):  # each epoch visits every image of each bucket once
        first_epoch = torch.cat([i for b, i in seen[:6] if b == bucket])
        assert sorted(first_epoch.tolist()) == [0, 1, 2, 3]


def test_an_image_with_several_captions_gets_each_in_turn():
    pixels = Pixels(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [["a", "b", "c"], "only"])
    generator = torch.Generator().manual_seed(0)
    picks = [pixels.pick_captions(torch.tensor([0, 1]), generator) for _ in range(60)]
    assert {p[0] for p in picks} == {"a", "b", "c"} and {p[1] for p in picks} == {"only"}


def test_data_check_cli_reports_counts_buckets_and_skips(tmp_path, capsys):
    expected = _broken_folder(tmp_path / "data")
    report_path = tmp_path / "report.json"
    args = ["--resolution", "32", "--bucket-step", "8", "--max-pixels", "1000000", "--json", str(report_path)]
    assert main(["data", "check", str(tmp_path / "data"), *args]) == 0
    printed = capsys.readouterr().out
    assert "8 of 12 images usable, 4 skipped" in printed
    for name in expected:
        assert f"{name}:" in printed
    report = json.loads(report_path.read_text())
    assert report["usable"] == 8 and sum(report["buckets"].values()) == 8 and report["captions"]["truncated"] == 0
    assert report["width"] == {"min": 16, "median": 20, "max": 24}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"")
    assert main(["data", "check", str(empty)]) == 2
