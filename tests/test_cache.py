"""The latent and text-embedding cache: keyed by what it depends on, atomic, flip-aware."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from ldm_pipeline.training import cache
from ldm_pipeline.training.cache import cached_latents, cached_texts
from ldm_pipeline.training.data import Pixels

from ldm_pipeline.presets import build_text_encoder, build_vae
from ldm_pipeline.tokenizer import load_clip_tokenizer


@pytest.fixture
def pixels():
    g = torch.Generator().manual_seed(0)
    return Pixels(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g), ["a"] * 3 + ["b"] * 3)


def test_latents_are_reused_and_any_change_recomputes(pixels, tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    first = cached_latents(vae, pixels, tmp_path)
    assert set(first) == {"mean", "std"} and first["mean"].shape[0] == 6
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")

    calls = []
    real = cache._encode_latents
    monkeypatch.setattr(cache, "_encode_latents", lambda *a: calls.append(1) or real(*a))
    again = cached_latents(vae, pixels, tmp_path)
    assert not calls and torch.equal(again["mean"], first["mean"])

    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # a weight change, even outside the encoder
    cached_latents(vae, pixels, tmp_path)
    other = Pixels(pixels.images.flip(-2), pixels.captions)
    cached_latents(vae, other, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 3


def test_flipped_latents_encode_the_mirrored_images(pixels, tmp_path):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    latents = cached_latents(vae, pixels, tmp_path, flip=True)
    mirrored = cached_latents(vae, Pixels(pixels.images.flip(-1), pixels.captions), tmp_path / "m")
    torch.testing.assert_close(latents["mean_flipped"], mirrored["mean"])
    assert not torch.allclose(latents["mean_flipped"], latents["mean"])


def test_failed_build_leaves_no_cache(pixels, tmp_path, monkeypatch):
    vae = build_vae("tiny")

    def broken(*args):
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(cache, "_encode_latents", broken)
    with pytest.raises(RuntimeError, match="encoder failed"):
        cached_latents(vae, pixels, tmp_path)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_run(pixels, tmp_path):
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".latents-0a1b.tmp.{host}.{int(gone.stdout)}.k7x_q"  # its writer has exited
    live = tmp_path / f".texts-0a1b.tmp.{host}.{os.getpid()}.abc"  # a writer still running
    remote = tmp_path / f".latents-0a1b.tmp.other-host.{int(gone.stdout)}.abc"  # another machine's
    for folder in (killed, live, remote):
        folder.mkdir()
        (folder / "tensors.safetensors").write_bytes(b"half")
    cached_latents(build_vae("tiny"), pixels, tmp_path)
    assert not killed.exists() and live.exists() and remote.exists()
    assert [p.name.startswith("latents-") for p in tmp_path.iterdir() if not p.name.startswith(".")] == [True]


def test_text_embeddings_cache(tmp_path):
    torch.manual_seed(0)
    encoder, tokenizer = build_text_encoder("tiny"), load_clip_tokenizer(16)
    embeds, index = cached_texts(encoder, tokenizer, ["b", "a", "b"], tmp_path)
    assert embeds.shape[0] == 3 and index.tolist() == [2, 1, 2]  # "" first, then sorted
    again, _ = cached_texts(encoder, tokenizer, ["b", "a", "b"], tmp_path)
    assert torch.equal(again, embeds) and len(list(tmp_path.iterdir())) == 1
    cached_texts(encoder, load_clip_tokenizer(12), ["b", "a", "b"], tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_models_fingerprint_is_the_same_in_every_process():
    """diffusers keeps ``_use_default_values`` in an order that varies with the process's hash seed."""
    code = (
        "import torch; from ldm_pipeline.presets import build_vae; "
        "from ldm_pipeline.training.cache import model_fingerprint; "
        "torch.manual_seed(0); print(model_fingerprint(build_vae('tiny')))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": s}
        )
        for s in ("1", "2")
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
