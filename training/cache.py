"""Latents and text embeddings computed once and cached on disk.

The UNet stage never runs the VAE encoder or the text encoder in its loop: both are frozen,
so their outputs are computed once and stored as safetensors, keyed by fingerprints of
everything they depend on, so that a later run with the same data and models reuses them and
any change recomputes them. Latents are cached raw (posterior mean and std) and normalised by
the VAE's ``scaling_factor`` at use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.tokenizer import token_ids

from .data import Pixels


def content_hash(*parts: torch.Tensor | str | dict | list) -> str:
    """A short SHA-256 of tensors' bytes and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((part.dtype, tuple(part.shape))).encode())
            digest.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a model's config and weights: any change to either changes it.

    Keys starting with "_" are bookkeeping, not the model (diffusers' ``_use_default_values`` is
    a list made from a set, in an order that changes from one process to the next)."""
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return content_hash(config, *model.state_dict().values())


# A cache being written: ".<entry>.tmp.<host>.<pid>.<random>" (the writer is named, so that a
# later run can tell a killed writer's folder from a live one's, even on a shared disk).
_WRITING = re.compile(r"^\.(?:latents|texts)-[0-9a-f]+\.tmp\.(?P<host>.+)\.(?P<pid>\d+)\.[^.]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_abandoned_writes(cache_dir: Path) -> None:
    """Delete temporary cache folders whose writer, a process on this machine, is gone (killed)."""
    host = socket.gethostname()
    for path in cache_dir.iterdir():
        found = _WRITING.match(path.name)
        if found and found["host"] == host and not _alive(int(found["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _load_or_build(folder: Path, build: Callable[[], dict[str, torch.Tensor]], meta: dict) -> dict[str, torch.Tensor]:
    """Tensors from ``folder`` if it holds a finished cache, else ``build()`` them and store them there.

    The cache is written to a temporary folder and renamed into place, so an interrupted run
    leaves no half-written cache; the temporary folder of a killed run is removed by the next.
    Files are read memory-mapped (safetensors' mmap backend).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_writes(folder.parent)
    if (folder / "meta.json").is_file():
        return load_file(folder / "tensors.safetensors")
    tensors = build()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp.{socket.gethostname()}.{os.getpid()}."))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # not a concurrent writer's finished cache
            raise
    return load_file(folder / "tensors.safetensors")


@torch.no_grad()
def _encode_latents(vae, pixels: Pixels, flip: bool, batch_size: int) -> dict[str, torch.Tensor]:
    vae.eval()
    out: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(pixels), batch_size), desc="cache latents", leave=False):
        index = torch.arange(start, min(start + batch_size, len(pixels)))
        x = pixels.float_batch(index).to(vae.device, vae.dtype)
        for suffix, batch in (("", x), ("_flipped", x.flip(-1))) if flip else (("", x),):
            dist = vae.encode(batch).latent_dist
            out.setdefault("mean" + suffix, []).append(dist.mean.float().cpu())
            out.setdefault("std" + suffix, []).append(dist.std.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def cached_latents(
    vae, pixels: Pixels, cache_dir: str | Path, flip: bool = False, batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """The VAE posterior's ``mean`` and ``std`` for every image (and ``*_flipped`` with ``flip``).

    Stored as safetensors under ``cache_dir``, keyed by the images' content, the VAE's weights
    and config, the resolution and the flip setting: a change to any of them makes a new entry.
    """
    parts = {
        "images": content_hash(pixels.images),
        "vae": model_fingerprint(vae),
        "resolution": list(pixels.images.shape[-2:]),
        "flip": flip,
    }
    folder = Path(cache_dir) / f"latents-{content_hash(parts)}"
    return _load_or_build(folder, lambda: _encode_latents(vae, pixels, flip, batch_size), parts)


@torch.no_grad()
def _encode_texts(text_encoder, tokenizer, unique: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    text_encoder.eval()
    chunks = []
    for start in range(0, len(unique), batch_size):
        ids = token_ids(tokenizer, unique[start : start + batch_size])
        chunks.append(text_encoder(ids.to(text_encoder.device))[0].float().cpu())
    return {"embeds": torch.cat(chunks)}


def cached_texts(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    texts: list[str],
    cache_dir: str | Path,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of each distinct caption and, per text, the index of its embedding.

    The empty caption (used for caption dropout and as the unconditional prompt) is always
    entry 0. Cached like `cached_latents`, keyed by the captions, the text encoder and the
    tokenizer's length.
    """
    unique = [""] + sorted(set(texts) - {""})
    position = {t: i for i, t in enumerate(unique)}
    parts = {
        "texts": content_hash(unique),
        "text_encoder": model_fingerprint(text_encoder),
        "max_length": tokenizer.model_max_length,
    }
    folder = Path(cache_dir) / f"texts-{content_hash(parts)}"
    embeds = _load_or_build(folder, lambda: _encode_texts(text_encoder, tokenizer, unique, batch_size), parts)
    return embeds["embeds"], torch.tensor([position[t] for t in texts])
