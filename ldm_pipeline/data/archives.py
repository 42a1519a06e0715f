"""WebDataset tar shards as a source: samples read by offset, never unpacked or loaded whole.

The layout img2dataset writes and WebDataset reads: each sample is the group of members of a
``.tar`` file that share a key (the member's name up to the first dot of its base name), e.g.
``000123.jpg``, ``000123.txt`` (the caption) and ``000123.json`` (metadata; its ``caption`` or
``text`` field is the caption when there is no ``.txt``). A source names the shards as a folder
holding ``.tar`` files, one ``.tar`` file, a glob (``shards/*.tar``) or a brace pattern
(``shards/{00000..00099}.tar``).

Each tar's headers are walked once; an image is kept as a cell ``{"path", "offset", "size",
"member"}`` that `ldm_pipeline.data.decode` reads with one seek, so a worker decoding one image
touches nothing else of its shard. A shard that breaks off mid-way keeps the samples before the
break and reports the rest; a missing image, caption or unreadable caption skips its sample
with the reason.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path

import datasets

from ..errors import InputError

ARCHIVE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")

MEMBER = datasets.Features(
    {
        "image": {
            "path": datasets.Value("string"),
            "offset": datasets.Value("int64"),
            "size": datasets.Value("int64"),
            "member": datasets.Value("string"),
        },
        "text": datasets.Value("string"),
        "skip": datasets.Value("string"),
    }
)


class ArchiveError(InputError):
    """Tar shards that cannot be used at all; the message says why."""


def expand_braces(pattern: str) -> list[str]:
    """``a/{00..02}.tar`` -> ``a/00.tar a/01.tar a/02.tar`` (zero padding kept); ``{x,y}`` -> each."""
    found = _BRACE.search(pattern)
    if not found:
        return [pattern]
    body = found.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        first, last = numbers.groups()
        options = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: found.start()], pattern[found.end() :]
    return [name for option in options for name in expand_braces(head + option + tail)]


def tar_shards(source: str) -> list[Path] | None:
    """The tar shards ``source`` names, or None when it names none (another kind of source).

    Raises:
        ArchiveError: a pattern that matches no file, or names compressed tars (their members
            cannot be read by offset).
    """
    path = Path(source)
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        return tars or None
    if path.is_file():
        return [path] if path.suffix == ".tar" else None
    if not any(ch in source for ch in "*?[{"):
        return None
    names = [name for pattern in expand_braces(source) for name in sorted(glob.glob(pattern))]
    if not names:
        raise ArchiveError(f"{source}: no file matches this pattern")
    if any(name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")) for name in names):
        raise ArchiveError(f"{source}: compressed tar shards cannot be read by offset; use uncompressed .tar")
    tars = [Path(name) for name in names if name.endswith(".tar")]
    if not tars:
        raise ArchiveError(f"{source}: matches {len(names)} file(s), none of them a .tar shard")
    return tars


def _key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _caption(archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[str | None, str | None]:
    """A sample's caption from its ``.txt`` (else its ``.json``'s caption or text), or why not."""
    try:
        if "txt" in members:
            return archive.extractfile(members["txt"]).read().decode("utf-8-sig").strip(), None
        if "json" in members:
            meta = json.loads(archive.extractfile(members["json"]).read())
            text = meta.get("caption") or meta.get("text") if isinstance(meta, dict) else None
            return (str(text) if text is not None else None), None
    except UnicodeDecodeError:
        return None, "caption not UTF-8"
    except (json.JSONDecodeError, ValueError) as err:
        return None, f"unreadable .json: {err}"
    return None, None


def _samples(tar: Path, rows: dict[str, list]) -> None:
    """Append each sample of one shard to ``rows`` (columns image, text, skip)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    problem = None
    try:
        with tarfile.open(tar, "r:") as archive:
            try:
                for member in archive:
                    if member.isfile():
                        key, ext = _key(member.name)
                        groups.setdefault(key, {})[ext] = member
            except (tarfile.TarError, OSError) as err:
                problem = f"tar shard breaks off after {len(groups)} sample(s): {err}"
            for key, members in groups.items():
                image = next((members[e] for e in ARCHIVE_IMAGE_EXTENSIONS if e in members), None)
                text, why = _caption(archive, members)
                cell = {"path": str(tar), "offset": 0, "size": 0, "member": key}
                if image is not None:
                    cell.update(offset=image.offset_data, size=image.size, member=image.name)
                else:
                    why = f"no image member ({', '.join(sorted(members))} only)"
                rows["image"].append(cell)
                rows["text"].append(text)
                rows["skip"].append(why)
    except (tarfile.TarError, OSError) as err:
        problem = f"unreadable tar shard: {err}"
    if problem:
        rows["image"].append({"path": str(tar), "offset": 0, "size": 0, "member": "(the rest)"})
        rows["text"].append(None)
        rows["skip"].append(problem)


def load_tar_shards(tars: list[Path]) -> datasets.Dataset:
    """Every sample of the shards, in order, as a ``Dataset`` of ``image`` (a member cell),
    ``text`` and ``skip``."""
    rows: dict[str, list] = {"image": [], "text": [], "skip": []}
    for tar in tars:
        _samples(tar, rows)
    if not rows["image"]:
        raise ArchiveError(f"{tars[0].parent}: the tar shards hold no sample")
    return datasets.Dataset.from_dict(rows, features=MEMBER)
