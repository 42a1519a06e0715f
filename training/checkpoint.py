"""Checkpoints that survive a kill at any moment, and the state that makes a resume exact.

A checkpoint is a folder ``step-00001234/`` holding ``state.safetensors`` (every tensor of the
state: weights, optimiser moments, EMA, RNG states) and ``state.json`` (the structure and the
non-tensor values), with no pickle anywhere. It is written to a temporary folder, flushed,
marked ``COMPLETE`` and renamed into place; older checkpoints are pruned only after that, and
pruned by a rename out of the ``step-*`` names before they are deleted, so a kill or a full disk
at any moment leaves the previous ones intact, and `latest_checkpoint` never returns an
incomplete or half-deleted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_pipeline.errors import UsageError
from ldm_pipeline.loading import non_finite_keys

COMPLETE = "COMPLETE"
FILES = ("state.safetensors", "state.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Room kept free beyond the checkpoint's own size.
_DISK_MARGIN = 64 * 2**20


class CheckpointError(UsageError, OSError):
    """A checkpoint that cannot be written or read; the message says why and what is intact."""


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure of ``value`` with each tensor moved into ``tensors`` under a path key."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _flatten(v, f"{key}.{k}", tensors) for k, v in value.items()}}
        # Optimiser states are keyed by parameter index: keep the keys' types.
        return {"__items__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key} in a checkpoint")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__dict__"].items()}
        if "__items__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
    return value


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int, meta: dict | None = None) -> Path:
    """Write ``state`` as the checkpoint of ``step`` under ``root`` atomically; keep the newest ``keep``.

    Raises:
        CheckpointError: not enough free disk, a non-finite weight, or a failed write; in every
            case the earlier checkpoints are left as they were.
    """
    root = Path(root)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "state", tensors)
    bad = non_finite_keys(tensors)
    if bad:
        raise CheckpointError(f"step {step}: not saving a checkpoint with non-finite values in {bad[:5]}")
    root.mkdir(parents=True, exist_ok=True)
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    free = shutil.disk_usage(root).free
    if free < need + _DISK_MARGIN:
        raise CheckpointError(
            f"step {step}: not enough disk space for a checkpoint in {root}: it needs about "
            f"{(need + _DISK_MARGIN) / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free; "
            "earlier checkpoints are intact"
        )
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".pruned-step-*")]:  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    final = checkpoint_dir(root, step)
    try:
        tmp.mkdir()
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "meta": meta or {}, "state": tree}))
        for name in ("state.safetensors", "state.json"):
            _fsync(tmp / name)
        (tmp / COMPLETE).write_text(str(step))
        _fsync(tmp / COMPLETE)
        if final.exists():  # the same step written again after a resume
            _discard(final)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"step {step}: writing the checkpoint to {root} failed ({err.strerror or err}); "
            "earlier checkpoints are intact"
        ) from err
    for old in complete_checkpoints(root)[:-keep]:
        try:
            _discard(old)
        except OSError as err:  # an extra old checkpoint is kept; nothing is lost
            print(f"could not prune the old checkpoint {old}: {err.strerror or err}", file=sys.stderr)
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint folder so that no kill leaves it half-deleted under its ``step-*`` name:
    it is renamed out of that namespace first (one atomic step), then removed."""
    doomed = checkpoint.with_name(f".pruned-{checkpoint.name}-{os.getpid()}")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and all((path / name).is_file() for name in FILES)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and _is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (an incomplete one is never returned)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any], dict]:
    """``(step, state, meta)`` of a checkpoint folder.

    Raises:
        CheckpointError: the folder is not a complete checkpoint or a file in it is corrupt.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: {', '.join(missing)} missing (half deleted?)")
    try:
        info = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from err
    try:
        return int(info["step"]), _unflatten(info["state"], tensors), info.get("meta", {})
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: state.json does not match state.safetensors ({err})") from err


class GeneratorState:
    """A ``torch.Generator`` as a stateful object for checkpoints."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])
