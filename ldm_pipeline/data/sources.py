"""User image+caption sources as one ``datasets.Dataset`` with columns ``image`` and ``text``.

One call, whatever the source (`load_source`):

- a folder in ``datasets``' imagefolder layout with ``metadata.jsonl`` or ``metadata.csv``;
- a folder of images with a same-name ``.txt`` caption beside each;
- a CSV, JSONL or Parquet file of image paths (relative to the file) and captions;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a Hub dataset id (the same ``load_dataset`` path as the imagefolder case).

Images are left undecoded (``datasets.Image(decode=False)``: a path or the bytes) so that
`ldm_pipeline.data.decode.decode_image` decides what is usable and why not, instead of one bad
file raising in the middle of an epoch. ``text`` holds a string or a list of strings (several
captions for one image).
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Column names tried, in order, when the user names none.
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path", "file")
CAPTION_COLUMNS = ("text", "caption", "prompt")


class SourceError(ValueError):
    """A data source that cannot be read as images and captions; the message says why."""


def _pick(columns: list[str], named: str | None, candidates: tuple[str, ...], what: str, source: str) -> str:
    if named is not None:
        if named not in columns:
            raise SourceError(f"{source}: no {what} column {named!r}; columns are {columns}")
        return named
    for name in candidates:
        if name in columns:
            return name
    raise SourceError(f"{source}: no {what} column (tried {list(candidates)}); columns are {columns}; name one")


def _normalise(
    ds: datasets.Dataset, image_column: str | None, caption_column: str | None, source: str, base: Path | None
) -> datasets.Dataset:
    """Keep the image and caption columns as ``image`` (undecoded) and ``text``."""
    image = _pick(ds.column_names, image_column, IMAGE_COLUMNS, "image", source)
    text = _pick(ds.column_names, caption_column, CAPTION_COLUMNS, "caption", source)
    ds = ds.select_columns([image, text]) if image != text else ds.select_columns([image])
    if base is not None and not isinstance(ds.features[image], datasets.Image):
        # Paths in a table are relative to the table's folder.
        ds = ds.map(lambda row: {image: str(base / row[image]) if row[image] else row[image]})
    ds = ds.cast_column(image, datasets.Image(decode=False))
    ds = ds.rename_columns({k: v for k, v in ((image, "image"), (text, "text")) if k != v})
    return ds.select_columns(["image", "text"])


def _text_folder(folder: Path) -> datasets.Dataset:
    """Images with a same-name .txt caption beside each (recursive); missing captions are None."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise SourceError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) and no metadata file")
    texts = []
    for path in images:
        caption = path.with_suffix(".txt")
        texts.append(caption.read_text(encoding="utf-8").strip() if caption.is_file() else None)
    return datasets.Dataset.from_dict({"image": [str(p) for p in images], "text": texts})


def _with_unlisted(ds: datasets.Dataset, folder: Path) -> datasets.Dataset:
    """Images in the folder that the metadata file does not list, added with no caption, so that
    the skip report names them instead of ``imagefolder`` leaving them out unseen."""
    listed = {str(Path(cell["path"]).resolve()) for cell in ds["image"] if cell and cell.get("path")}
    images = (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS)
    unlisted = [str(p) for p in images if str(p.resolve()) not in listed]
    if not unlisted:
        return ds
    extra = datasets.Dataset.from_dict({"image": unlisted, "text": [None] * len(unlisted)})
    extra = extra.cast_column("image", datasets.Image(decode=False)).cast(ds.features)
    return datasets.concatenate_datasets([ds, extra])


def _split(ds: datasets.Dataset | datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"{source}: no split {split!r}; splits are {list(ds)}")
        return ds[split]
    return ds


def load_source(
    source: str | os.PathLike,
    caption_column: str | None = None,
    image_column: str | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """Load any supported source as a ``Dataset`` with ``image`` (undecoded) and ``text`` columns.

    Args:
        source: a folder, a CSV/JSONL/Parquet file, a ``save_to_disk`` folder or a Hub dataset id.
        caption_column: the caption column (default: the first of text, caption, prompt).
        image_column: the image column of a table or Hub dataset (default: image, file_name, ...).
        split: the split of a Hub dataset or of a saved ``DatasetDict``.

    Raises:
        SourceError: the source is missing, empty or lacks an image or caption column.
    """
    name = str(source)
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = _split(datasets.load_from_disk(str(path)), split, name)
            return _normalise(ds, image_column, caption_column, name, None)
        if any((path / f"metadata{ext}").is_file() for ext in (".jsonl", ".csv", ".parquet")):
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
            return _with_unlisted(_normalise(ds, image_column, caption_column, name, None), path)
        return _normalise(_text_folder(path), None, None, name, None)
    if path.is_file():
        builder = TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise SourceError(f"{name}: a file source must be one of {sorted(TABLE_BUILDERS)}")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        return _normalise(ds, image_column, caption_column, name, path.parent)
    # Not a file or folder here: a Hub id ("name" or "owner/name") or a mistyped path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise SourceError(f"data source not found: {name}")
    try:
        ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise SourceError(f"could not load the Hub dataset {name!r}: {str(err).splitlines()[0]}") from err
    return _normalise(ds, image_column, caption_column, name, None)


def captions_of(value: str | list | None) -> list[str]:
    """A ``text`` cell as a list of non-empty captions (one string, or several)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if t is not None and str(t).strip()]


def describe(cell: dict, row: int) -> str:
    """How a report names an image: its path, else its row."""
    path = cell.get("path") if isinstance(cell, dict) else None
    return path or f"row {row}"
