"""A disk cache in shards: safetensors files of bounded size, written as they are computed, read by row.

The cache of a user's data set (`cached_latent_shards`, `cached_text_shards`) is planned before
anything is encoded: rows grouped by bucket, cut into shards of at most ``shard_mb``, shard j
written by process ``j % world_size``. The plan depends on the data, the models and the settings,
never on the number of processes, so one process or eight make the same cache, and a run killed
while caching finds its finished shards and encodes only the rest (a shard is renamed into place
whole, or is absent; one that does not parse or is shorter than its header says is redone).

Rows are read back by offset (one ``os.pread`` per row and tensor, `ShardFile`): a training step
reads its batch and nothing else stays in memory, whatever the size of the cache.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ldm_pipeline.errors import InputError
from ldm_pipeline.files import write_atomically

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


class BrokenShard(ValueError):
    """A shard file that is truncated or does not parse: it is encoded again."""


class ShardFile:
    """One finished safetensors shard, read by row without loading or mapping the file.

    The format is safetensors' own: 8 bytes of header length, a JSON header naming each tensor's
    dtype, shape and byte range, then the data.

    Raises:
        BrokenShard: the file is shorter than its header says, or the header does not parse.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._base = 8 + length
            self._tensors = {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}
        except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
            raise BrokenShard(f"{self.path.name}: not a readable shard ({err})") from err
        end = max((span[1] for _, _, span in self._tensors.values()), default=0)
        if self.path.stat().st_size != self._base + end:
            raise BrokenShard(f"{self.path.name}: {self.path.stat().st_size} bytes, its header says {self._base + end}")

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1]

    def rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` (stacked along the first dimension)."""
        dtype, shape, (start, _) = self._tensors[name]
        size = int(np.prod(shape[1:], dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        out = bytearray(size * len(rows))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows):
                out[i * size : (i + 1) * size] = os.pread(fd, size, self._base + start + row * size)
        finally:
            os.close(fd)
        return torch.frombuffer(out, dtype=dtype).reshape(len(rows), *shape[1:]) if rows else torch.empty(0, *shape[1:])

    def tensor(self, name: str) -> torch.Tensor:
        """The whole of a (small) tensor, such as a shard's row index."""
        return self.rows(name, list(range(self.shape(name)[0])))


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard under a temporary name and rename it onto ``path``: finished or absent."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def open_finished(path: Path) -> ShardFile | None:
    """The shard at ``path`` if it is whole; a broken one is deleted (to be encoded again)."""
    if not path.is_file():
        return None
    try:
        return ShardFile(path)
    except BrokenShard as err:
        print(f"cache: {err}; encoding it again")
        path.unlink(missing_ok=True)
        return None


@dataclass
class ShardPlan:
    """One shard to write: its file name and the positions (into the data's rows) it holds."""

    name: str
    positions: list[int]


def cut(positions: list[int], rows_per_shard: int, prefix: str) -> list[ShardPlan]:
    """``positions`` cut into shards of ``rows_per_shard`` named ``<prefix>-00000.safetensors``, ..."""
    return [
        ShardPlan(f"{prefix}-{k:05d}.safetensors", positions[start : start + rows_per_shard])
        for k, start in enumerate(range(0, len(positions), rows_per_shard))
    ]


def rows_per_shard(row_bytes: int, shard_mb: float) -> int:
    """How many rows of ``row_bytes`` fit in a shard of ``shard_mb`` MiB (at least one)."""
    return max(1, int(shard_mb * 2**20) // max(row_bytes, 1))


def mine(plans: list[ShardPlan], rank: int, world: int) -> list[ShardPlan]:
    """This process's shards: every ``world``-th, from its ``rank``."""
    return [plan for j, plan in enumerate(plans) if j % world == rank]


def wait_for_shards(folder: Path, plans: list[ShardPlan], what: str, poll_seconds: float = 2.0) -> None:
    """Wait until every planned shard exists (written by the other processes). A file poll, not a
    collective: caching may take hours, longer than a process group's barrier waits."""
    missing = [p for p in plans if not (folder / p.name).is_file()]
    said = False
    while missing:
        if not said:
            print(f"cache: waiting for {len(missing)} {what} shard(s) from the other processes")
            said = True
        time.sleep(poll_seconds)
        missing = [p for p in missing if not (folder / p.name).is_file()]


class RowTensor:
    """A cached tensor spread over shards, indexed like one ``[N, ...]`` tensor: ``t[index]``
    reads those rows from disk."""

    def __init__(self, name: str, where: list[tuple[ShardFile, int]]):
        if not where:
            raise InputError(f"cache: no rows of {name}")
        self.name, self.where = name, where
        first, _ = where[0]
        self.shape = (len(where), *first.shape(name)[1:])

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, index: torch.Tensor | list[int] | int) -> torch.Tensor:
        if isinstance(index, int):
            shard, row = self.where[index]
            return shard.rows(self.name, [row])[0]
        picks = [self.where[i] for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        # One read call per run of rows from the same shard (a file opened once per run, not per row).
        runs = itertools.groupby(picks, key=lambda pick: pick[0])
        return torch.cat([shard.rows(self.name, [row for _, row in run]) for shard, run in runs])
