"""WebDataset tar shards as a source: folder, glob and brace patterns, members read by offset,
broken samples and shards skipped and reported, the sharded cache made from them."""

import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ldm_pipeline.training.config import DataConfig
from ldm_pipeline.training.data import load_source_set
from ldm_pipeline.training.source_cache import cached_source_latents
from PIL import Image

from ldm_pipeline.data.archives import ArchiveError, expand_braces
from ldm_pipeline.data.decode import decode_image
from ldm_pipeline.data.prepare import scan
from ldm_pipeline.data.sources import SourceError, describe, load_source
from ldm_pipeline.presets import build_vae


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards in img2dataset's layout; the second breaks off after its first sample."""
    root = tmp_path_factory.mktemp("wds") / "shards"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as archive:
        for i in range(6):
            _add(archive, f"{i:05d}.jpg", _image(i))
            _add(archive, f"{i:05d}.txt", f"sample {i}".encode())
            _add(archive, f"{i:05d}.json", json.dumps({"key": i}).encode())
        _add(archive, "00006.png", _image(6, "PNG"))
        _add(archive, "00006.json", json.dumps({"caption": "caption from json"}).encode())
        _add(archive, "00007.jpg", _image(7))  # no caption
        _add(archive, "00008.txt", b"a caption without an image")
        _add(archive, "00009.jpg", _image(9)[:1200])  # cut inside the JPEG's data, after its header
        _add(archive, "00009.txt", b"cut image")
        _add(archive, "00010.jpg", _image(10))
        _add(archive, "00010.txt", b"\xff\xfe not utf-8")
    whole = root / "whole.tar"
    with tarfile.open(whole, "w") as archive:
        for i in range(11, 14):
            _add(archive, f"{i:05d}.jpg", _image(i))
            _add(archive, f"{i:05d}.txt", f"sample {i}".encode())
    with tarfile.open(whole) as archive:
        cut = archive.getmember("00012.jpg")
    (root / "00001.tar").write_bytes(whole.read_bytes()[: cut.offset_data + cut.size // 2])  # breaks off mid-way
    whole.unlink()
    return root


def test_brace_patterns_expand_with_their_padding():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_a_folder_a_glob_and_a_brace_pattern_name_the_same_shards(shards):
    by_folder = load_source(str(shards))
    assert load_source(str(shards / "*.tar"))["image"] == by_folder["image"]
    assert load_source(str(shards / "{00000..00001}.tar"))["image"] == by_folder["image"]
    assert len(load_source(str(shards / "00000.tar"))) == 11
    with pytest.raises(ArchiveError, match="no file matches"):
        load_source(str(shards / "{00005..00006}.tar"))
    with pytest.raises(SourceError, match="mask_column is not read from tar shards"):
        load_source(str(shards), mask_column="mask")


def test_members_are_read_by_offset_and_every_broken_sample_is_reported(shards):
    ds = load_source(str(shards))
    first = ds[0]
    assert first["text"] == "sample 0" and describe(first["image"], 0).endswith("00000.tar:00000.jpg")
    assert np.array_equal(np.asarray(decode_image(first["image"])), np.asarray(Image.open(io.BytesIO(_image(0)))))
    found = scan(ds, progress=False, headers_only=True)
    reasons = {s.item.rsplit(":", 1)[-1]: s.reason for s in found.skipped}
    assert "no caption" in reasons["00007.jpg"]
    assert reasons["00008"].startswith("no image member (txt only)")
    assert reasons["00010.jpg"] == "caption not UTF-8"
    assert "breaks off after" in reasons["(the rest)"] and "no caption" in reasons["00012.jpg"]  # its .txt was cut
    captions = {c[0] for c in found.captions}
    assert "caption from json" in captions and "cut image" in captions  # the cut JPEG's header reads
    assert sorted(captions) == sorted(
        ["caption from json", "cut image", "sample 11"] + [f"sample {i}" for i in range(6)]
    )


def test_the_sharded_cache_is_made_from_tar_members(shards, tmp_path):
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    cfg = DataConfig(source=str(shards / "*.tar"), resolution=32, max_skipped_fraction=0.9, num_workers=1)
    source = load_source_set(cfg, step=8, min_bucket_size=1, report_dir=tmp_path)
    one = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    buckets, skipped, _ = cached_source_latents(vae, source, cfg, tmp_path / "cache", one)
    assert [s["item"].rsplit(":", 1)[-1] for s in skipped] == ["00009.jpg"]
    (rows,) = buckets
    assert len(rows) == 8 and rows.latents["mean"].shape == (8, 4, 16, 16)
    report = [json.loads(line)["item"] for line in (tmp_path / "skipped_images.jsonl").read_text().splitlines()]
    assert report[-1].endswith("00000.tar:00009.jpg") and len(report) == 6  # 5 from the scan, then the decode's


@pytest.mark.parametrize("layout", ["binary", "struct"])
def test_a_parquet_file_of_image_bytes_is_read_row_by_row(tmp_path, layout):
    import pyarrow
    import pyarrow.parquet

    images = [_image(i) for i in range(5)] + [b"not an image"]
    cells = images if layout == "binary" else [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)]
    table = pyarrow.table({"image": cells, "caption": [f"row {i}" for i in range(6)]})
    pyarrow.parquet.write_table(table, tmp_path / "set.parquet", row_group_size=2)
    ds = load_source(str(tmp_path / "set.parquet"))
    assert ds.column_names == ["image", "text", "skip"] and len(ds) == 6
    found = scan(ds, progress=False, headers_only=True)
    assert len(found.rows) == 5 and found.skipped[0].reason == "not an image file"
    assert np.array_equal(np.asarray(decode_image(ds[3]["image"])), np.asarray(Image.open(io.BytesIO(images[3]))))


def test_a_local_dataset_read_as_a_stream_is_cached_in_one_more_pass(tmp_path):
    import datasets

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = []
    for i in range(7):
        (folder / f"{i}.jpg").write_bytes(_image(i))
        lines.append(json.dumps({"file_name": f"{i}.jpg", "text": f"picture {i}"}))
    (folder / "6.jpg").write_bytes(_image(6)[:1200])  # found when decoded
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_source(str(folder), streaming=True)
    assert isinstance(ds, datasets.IterableDataset) and {"image", "text", "skip"} <= set(ds.column_names)
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    one = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    got = {}
    for streaming in (True, False):
        cfg = DataConfig(source=str(folder), resolution=32, streaming=streaming, num_workers=2, shard_mb=0.002)
        source = load_source_set(cfg, step=8, min_bucket_size=1, report_dir=tmp_path / str(streaming))
        assert source.found.total == 7 and len(source) == 7
        (rows,), skipped, _ = cached_source_latents(vae, source, cfg, tmp_path / f"cache-{streaming}", one)
        assert [s["item"].rsplit("/", 1)[-1] for s in skipped] == ["6.jpg"] and len(rows) == 6
        got[streaming] = {c[0]: rows.latents["mean"][[i]] for i, c in enumerate(rows.captions)}
    assert got[True].keys() == got[False].keys()
    for caption, mean in got[True].items():
        torch.testing.assert_close(mean, got[False][caption], rtol=1e-4, atol=1e-5)


def test_data_settings_that_cannot_work_together_are_refused_by_name():
    from ldm_pipeline.training.config import ConfigError, config_from_dict

    cases = [
        ({"source": "x", "streaming": True, "cache": "none"}, ["unet"], "data.cache: none draws batches at random"),
        ({"source": "x", "streaming": True}, ["vae", "clip", "unet"], "data.streaming: the vae and clip stages"),
        ({"streaming": True}, ["unet"], "data.streaming: needs a data.source"),
        ({"cache": "none"}, ["unet"], "data.cache: none encodes a data.source"),
        ({"source": "x", "cache": "ram"}, ["unet"], r"data.cache: must be one of \['disk', 'none'\]"),
        ({"source": "x", "num_workers": -1}, ["unet"], "data.num_workers: must be >= 0"),
        ({"source": "x", "encode_batch_size": 0}, ["unet"], "data.encode_batch_size: must be positive"),
        ({"source": "x", "shard_mb": 0}, ["unet"], "data.shard_mb: must be positive"),
    ]
    for data, stages, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"model": "tiny", "stages": stages, "data": data})
