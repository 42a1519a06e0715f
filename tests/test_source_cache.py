"""A user source cached in shards: planned, written as encoded, read by row, split over processes,
resumed after a kill, broken shards redone, memory-sized encoder batches."""

import io
import json
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ldm_pipeline.training import source_cache
from ldm_pipeline.training.config import DataConfig
from ldm_pipeline.training.data import load_source_set
from ldm_pipeline.training.shards import ShardFile
from ldm_pipeline.training.source_cache import cached_source_latents, cached_text_shards, encoder_bytes_per_image
from PIL import Image

from ldm_pipeline.data.buckets import fit_to_bucket
from ldm_pipeline.data.decode import SkippedImage, decode_image, probe_image
from ldm_pipeline.errors import InputError
from ldm_pipeline.presets import build_text_encoder, build_vae
from ldm_pipeline.tokenizer import load_clip_tokenizer


def _one(rank=0, world=1):
    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 JPEGs of two aspect ratios with captions, and one truncated past its header."""
    root = tmp_path_factory.mktemp("src") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        w, h = (64, 40) if i % 2 else (40, 64)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.jpg", quality=90)
        (root / f"img{i:02d}.txt").write_text(f"picture {i}")
    whole = (root / "img00.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "cut.txt").write_text("a cut file")
    return root


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae("tiny").eval()


def _cfg(folder, **kw):
    base = {"source": str(folder), "resolution": 32, "bucketing": True, "max_skipped_fraction": 0.5}
    return DataConfig(**{**base, "num_workers": 0, "shard_mb": 0.004, **kw})


def _source(folder, tmp_path, **kw):
    cfg = _cfg(folder, **kw)
    return cfg, load_source_set(cfg, step=8, min_bucket_size=2, report_dir=tmp_path, main_process=True)


def _contents(folder):
    """Every shard's tensors and metadata, by file name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        shard = ShardFile(path)
        out[path.name] = ({n: shard.tensor(n) for n in shard.names()}, shard.metadata)
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        (ta, ma), (tb, mb) = a[name], b[name]
        assert ma == mb and ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)


def test_header_probe_reads_sizes_with_orientation_and_leaves_truncation_to_the_decode(folder, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn: stored 64x40, seen 40x64
    buffer = io.BytesIO()
    Image.new("RGB", (64, 40), "red").save(buffer, "JPEG", exif=exif)
    assert probe_image(buffer.getvalue()) == (40, 64) == decode_image(buffer.getvalue()).size
    assert probe_image(str(folder / "cut.jpg")) == (40, 64)
    with pytest.raises(SkippedImage, match="truncated or corrupt"):
        decode_image(str(folder / "cut.jpg"))
    for data, reason in ((b"", "zero-byte"), (b"words", "not an image")):
        with pytest.raises(SkippedImage, match=reason):
            probe_image(data)


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path):
    path = tmp_path / "profiled.jpg"
    Image.new("RGB", (48, 20), "blue").save(path, "JPEG", icc_profile=bytes(200_000))  # APP2 blocks before the frame
    assert path.stat().st_size > 2**16 and probe_image(str(path)) == (48, 20)


def test_draft_decoding_covers_the_size_asked_for():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 1200, 3), dtype=np.uint8)).save(buffer, "JPEG")
    image = decode_image(buffer.getvalue(), draft=(260, 173))
    assert image.size == (300, 200)  # 1/4 scale: the coarsest that still covers 260x173
    assert decode_image(buffer.getvalue()).size == (1200, 800)


def test_shards_hold_each_images_posterior_read_back_by_row(folder, vae, tmp_path):
    cfg, source = _source(folder, tmp_path, random_flip=True)
    assert len(source) == 15 and source.found.skipped == []  # the truncated file passes the header scan
    buckets, skipped, _ = cached_source_latents(vae, source, cfg, tmp_path / "cache", _one())
    assert [s["reason"].split(":")[0] for s in skipped] == ["truncated or corrupt image"]
    report = [json.loads(line) for line in (tmp_path / "skipped_images.jsonl").read_text().splitlines()]
    assert [r["item"].rsplit("/", 1)[-1] for r in report] == ["cut.jpg"]  # appended as it was found
    (shards,) = (tmp_path / "cache").glob("latent-shards-*")
    assert len(list(shards.glob("*.safetensors"))) > 2  # bounded shards, several per bucket
    assert sorted((b.bucket, len(b)) for b in buckets) == [((24, 40), 7), ((40, 24), 7)]
    tall = next(b for b in buckets if b.bucket == (24, 40))
    assert set(tall.latents) == {"mean", "std", "mean_flipped", "std_flipped"} and tall.masks is None
    index = torch.tensor([4, 1])
    captions = [tall.captions[i][0] for i in index.tolist()]
    files = [folder / f"img{int(c.split()[1]):02d}.jpg" for c in captions]
    pixels = [decode_image(str(f), draft=(25, 40)) for f in files]
    x = torch.stack([torch.from_numpy(fit_to_bucket(p, (24, 40))).permute(2, 0, 1) for p in pixels])
    with torch.no_grad():
        dist = vae.encode(x.float() / 127.5 - 1.0).latent_dist
        mirrored = vae.encode(x.flip(-1).float() / 127.5 - 1.0).latent_dist
    torch.testing.assert_close(tall.latents["mean"][index], dist.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tall.latents["std_flipped"][index], mirrored.std, rtol=1e-4, atol=1e-5)
    assert tall.latents["mean"].shape == (7, *dist.mean.shape[1:])
    lines = [json.loads(line) for line in (shards / "index.jsonl").read_text().splitlines()]
    assert len(lines) == 14 and {e["bucket"] for e in lines} == {"24x40", "40x24"}
    entry = next(e for e in lines if e["captions"] == ["picture 3"])
    assert entry["image"].endswith("img03.jpg") and (shards / entry["shard"]).is_file()
    assert ShardFile(shards / entry["shard"]).metadata["bucket"] == entry["bucket"]


def test_a_second_run_reuses_the_cache_and_a_changed_file_makes_a_new_one(folder, vae, tmp_path, monkeypatch):
    cfg, source = _source(folder, tmp_path)
    _, first, _ = cached_source_latents(vae, source, cfg, tmp_path / "cache", _one())
    calls = []
    monkeypatch.setattr(source_cache, "_encode_shards", lambda *a: calls.append(a[2]))
    _, again, _ = cached_source_latents(vae, source, cfg, tmp_path / "cache", _one())
    assert calls == [[]]  # nothing left to encode
    assert again == first and len(again) == 1  # the truncated file, kept in its shard's metadata
    source.write_report(again)
    report = (tmp_path / "skipped_images.jsonl").read_text().splitlines()
    assert len(report) == 1 and "cut.jpg" in report[0]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    _, moved = _source(copy, tmp_path)
    assert moved.found.fingerprint != source.found.fingerprint  # other paths: other files


def test_two_processes_split_the_shards_and_make_the_one_processs_cache(folder, vae, tmp_path):
    cfg, source = _source(folder, tmp_path)
    cached_source_latents(vae, source, cfg, tmp_path / "one", _one())
    results = {}

    def rank(r):
        results[r] = cached_source_latents(vae, source, cfg, tmp_path / "two", _one(r, 2))

    other = threading.Thread(target=rank, args=(1,))
    other.start()
    rank(0)
    other.join()
    (one,) = (tmp_path / "one").glob("latent-shards-*")
    (two,) = (tmp_path / "two").glob("latent-shards-*")
    _same(_contents(one), _contents(two))
    assert [len(b) for b in results[0][0]] == [len(b) for b in results[1][0]] == [7, 7]


KILLER = """
import os, signal, sys
from types import SimpleNamespace
import torch
from ldm_pipeline.training import shards, source_cache
from ldm_pipeline.training.config import DataConfig
from ldm_pipeline.training.data import load_source_set
from ldm_pipeline.presets import build_vae

folder, cache, report, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
vae = build_vae("tiny").eval()
cfg = DataConfig(source=folder, resolution=32, bucketing=True, max_skipped_fraction=0.5, num_workers=1, shard_mb=0.004)
source = load_source_set(cfg, step=8, min_bucket_size=2, report_dir=None)
written = []
real = source_cache.write_shard
def write_then_die(*args):
    real(*args)
    written.append(1)
    if len(written) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
source_cache.write_shard = write_then_die
one = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
source_cache.cached_source_latents(vae, source, cfg, cache, one)
"""


def test_caching_killed_mid_way_keeps_finished_shards_and_ends_equal_to_an_uninterrupted_cache(folder, vae, tmp_path):
    args = [sys.executable, "-c", KILLER, str(folder), str(tmp_path / "killed"), "-"]
    killed = subprocess.run([*args, "2"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    (partial,) = (tmp_path / "killed").glob("latent-shards-*")
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}
    assert len(kept) == 2
    again = subprocess.run([*args, "0"], capture_output=True, text=True)  # the same command, run again
    assert again.returncode == 0, again.stderr
    (whole,) = (tmp_path / "killed").glob("latent-shards-*")
    files = sorted(whole.glob("*.safetensors"))
    assert len(files) > 3 and not list(whole.glob(".*"))  # no temporary file left
    first_kept = sorted(kept)[0]
    assert (whole / first_kept).stat().st_mtime_ns == kept[first_kept]  # finished shards were not redone
    # A shard broken on disk (truncated) is found and encoded again.
    victim = next(f for f in files if f.name not in kept)
    victim.write_bytes(victim.read_bytes()[:-10])
    cfg, source = _source(folder, tmp_path)
    cached_source_latents(vae, source, cfg, tmp_path / "killed", _one())
    cached_source_latents(vae, source, cfg, tmp_path / "straight", _one())
    (straight,) = (tmp_path / "straight").glob("latent-shards-*")
    _same(_contents(whole), _contents(straight))


def test_text_embeddings_in_shards_by_row(tmp_path):
    torch.manual_seed(0)
    encoder, tokenizer = build_text_encoder("tiny").eval(), load_clip_tokenizer(16)
    rows, row_of = cached_text_shards(encoder, tokenizer, {"b", "a", "c", ""}, tmp_path, 0.002, _one())
    assert row_of == {"": 0, "a": 1, "b": 2, "c": 3}
    assert len(list(tmp_path.glob("text-shards-*/*.safetensors"))) > 1
    from ldm_pipeline.tokenizer import token_ids

    with torch.no_grad():
        direct = encoder(token_ids(tokenizer, ["c"]))[0][0]
    torch.testing.assert_close(rows[row_of["c"]], direct)


def test_encoder_batch_follows_memory_and_out_of_memory_names_the_setting(folder, vae, tmp_path, monkeypatch):
    sd15 = SimpleNamespace(
        config=SimpleNamespace(block_out_channels=[128, 256, 512, 512], mid_block_add_attention=True),
        dtype=torch.float32,
    )
    assert 0.6e9 < encoder_bytes_per_image(sd15, (512, 512)) < 1.0e9  # measured: 0.64 GB per image
    monkeypatch.setattr(source_cache.psutil, "virtual_memory", lambda: SimpleNamespace(available=16 * 2**30))
    per = encoder_bytes_per_image(vae, (32, 32))
    assert source_cache.encode_batch_size(vae, (32, 32), None) == min(64, int(4 * 2**30 // per))
    assert source_cache.encode_batch_size(vae, (32, 32), 3) == 3

    def no_memory(x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")

    cfg, source = _source(folder, tmp_path, encode_batch_size=4, shard_mb=64)
    monkeypatch.setattr(vae, "encode", no_memory)
    # The first batch of 4 holds the truncated file: 3 images reach the encoder.
    with pytest.raises(
        InputError, match=r"out of memory encoding 3 image\(s\) .* set data.encode_batch_size to fewer \(now 4\)"
    ):
        cached_source_latents(vae, source, cfg, tmp_path / "cache", _one())
    assert not list((tmp_path / "cache").glob("*/*.safetensors"))


def test_encoding_in_the_loop_gives_the_caches_latents_and_stands_in_for_a_broken_image(folder, vae, tmp_path):
    from ldm_pipeline.training.data import micro_batches
    from ldm_pipeline.training.in_loop import InLoopEncoder

    cfg, source = _source(folder, tmp_path, random_flip=True)
    cached, _, _ = cached_source_latents(vae, source, cfg, tmp_path / "cache", _one())
    by_caption = {(b.bucket, c[0]): (b, i) for b in cached for i, c in enumerate(b.captions)}
    (tmp_path / "skipped_images.jsonl").write_text("")
    encoder = InLoopEncoder(vae, source, flip=True, workers=1)
    rows = encoder.buckets()
    assert sorted(len(r) for r in rows) == [7, 8]  # the truncated file is only found when decoded
    encoder.sampler = micro_batches(rows, 4, 1, 3, _one())
    stood_in = 0
    for _ in range(8):
        batch = next(encoder.sampler)
        got = batch.pixels.latents["mean_flipped"][batch.index]
        for j, i in enumerate(batch.index.tolist()):
            caption = batch.pixels.captions[i][0]
            if caption == "a cut file":
                stood_in += 1
                assert any(torch.equal(got[j], got[k]) for k in range(len(got)) if k != j)
                continue
            bucket, row = by_caption[(batch.pixels.bucket, caption)]
            torch.testing.assert_close(got[j], bucket.latents["mean_flipped"][row], rtol=1e-4, atol=1e-5)
    assert stood_in > 0
    assert "cut.jpg" in (tmp_path / "skipped_images.jsonl").read_text()


def test_loss_masks_are_cached_on_the_latent_grid(vae, tmp_path):
    folder = tmp_path / "masked"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"a{i}.png")
        (folder / f"a{i}.txt").write_text(f"masked {i}")
        if i < 2:  # the left half trained, the right half ignored
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[:, :16] = 255
            Image.fromarray(mask).save(folder / f"a{i}_mask.png")
    cfg = _cfg(folder, bucketing=False)
    source = load_source_set(cfg, step=8, min_bucket_size=2, report_dir=tmp_path, masks=True)
    (rows,), _, _ = cached_source_latents(vae, source, cfg, tmp_path / "cache", _one())
    masks = rows.masks[torch.arange(4)]
    assert masks.shape == (4, 1, 16, 16)
    by_caption = {c[0]: m for c, m in zip(rows.captions, masks, strict=True)}
    half = by_caption["masked 0"][0]
    assert torch.equal(half[:, :8], torch.full((16, 8), 255.0)) and torch.equal(half[:, 8:], torch.zeros(16, 8))
    assert torch.equal(by_caption["masked 3"], torch.full((1, 16, 16), 255.0))  # no mask: all trained
