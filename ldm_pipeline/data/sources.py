"""User image+caption sources as one ``datasets.Dataset`` with columns ``image``, ``text``, ``skip``.

One call, whatever the source (`load_source`):

- a folder in ``datasets``' imagefolder layout with ``metadata.jsonl`` or ``metadata.csv``;
- a folder of images with a same-name ``.txt`` caption beside each;
- a CSV, JSONL or Parquet file of image paths (relative to the file) and captions;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- WebDataset tar shards: a folder of ``.tar`` files, a glob or a brace pattern
  (``shards/{00000..00099}.tar``), read by offset (`ldm_pipeline.data.archives`);
- a Hub dataset id (the same ``load_dataset`` path as the imagefolder case).

Images are left undecoded (``datasets.Image(decode=False)``: a path or the bytes) so that
`ldm_pipeline.data.decode.decode_image` decides what is usable and why not, instead of one bad
file raising in the middle of an epoch. ``text`` holds a string or a list of strings (several
captions for one image). ``skip`` is None, or why the source itself refused the row before any
image was read (a table row that does not parse, a caption file that is not UTF-8, a path that
leaves the data folder): `ldm_pipeline.data.prepare.scan` reports those rows with the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from ..errors import InputError
from .archives import load_tar_shards, tar_shards
from .tables import TABLE_SUFFIXES, TableError, read_table

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A data folder's own table, in the order looked for (``datasets``' imagefolder names).
METADATA_SUFFIXES = (".jsonl", ".csv", ".parquet")
# Column names tried, in order, when the user names none.
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path", "file")
CAPTION_COLUMNS = ("text", "caption", "prompt")
# A loss mask beside its image: "cat.png" + "cat_mask.png" (white: trained, black: ignored).
MASK_SUFFIX = "_mask"


class SourceError(InputError):
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


def _with_skip_column(ds: datasets.Dataset | datasets.IterableDataset) -> datasets.Dataset | datasets.IterableDataset:
    if isinstance(ds, datasets.IterableDataset):
        features = datasets.Features({**ds.features, "skip": datasets.Value("string")})
        return ds.map(lambda row: {"skip": None}, features=features)
    return ds.add_column("skip", [None] * len(ds), feature=datasets.Value("string"))


def _normalise(
    ds: datasets.Dataset, image_column: str | None, caption_column: str | None, source: str, mask_column: str | None
) -> datasets.Dataset:
    """Keep a ``datasets`` dataset's image and caption columns as ``image`` (undecoded) and ``text``
    (and a named mask column as ``mask``, undecoded)."""
    image = _pick(ds.column_names, image_column, IMAGE_COLUMNS, "image", source)
    text = _pick(ds.column_names, caption_column, CAPTION_COLUMNS, "caption", source)
    mask = _pick(ds.column_names, mask_column, (), "mask", source) if mask_column else None
    ds = ds.select_columns(list(dict.fromkeys(c for c in (image, text, mask) if c)))
    ds = ds.cast_column(image, datasets.Image(decode=False))
    if mask:
        ds = ds.cast_column(mask, datasets.Image(decode=False))
    names = {image: "image", text: "text", **({mask: "mask"} if mask else {})}
    ds = ds.rename_columns({k: v for k, v in names.items() if k != v})
    return _with_skip_column(ds.select_columns(["image", "text", *(["mask"] if mask else [])]))


def _rows(images: list, texts: list, skips: list[str | None], masks: list | None = None) -> datasets.Dataset:
    """Rows read here as a dataset; ``text`` holds strings, or lists of them if any row has several."""
    several = any(isinstance(t, list) for t in texts)
    if several:
        texts = [t if t is None or isinstance(t, list) else [t] for t in texts]
    texts = [None if t is None else [str(c) for c in t] if isinstance(t, list) else str(t) for t in texts]
    caption = datasets.Sequence(datasets.Value("string")) if several else datasets.Value("string")
    columns = {"image": images, "text": texts, "skip": skips}
    features = {"image": datasets.Image(decode=False), "text": caption, "skip": datasets.Value("string")}
    if masks is not None:
        columns["mask"], features["mask"] = masks, datasets.Image(decode=False)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _inside(path: Path, folder: Path) -> bool:
    # Decided on the path as written (``..`` folded), before anything is opened: a link the user
    # placed inside the folder is followed, a path that climbs out of it is never read.
    return os.path.abspath(path).startswith(os.path.join(os.path.abspath(folder), ""))


def _image_cell(value: object, base: Path, within: Path | None) -> tuple[object, str | None]:
    """A table's image cell as a path (relative to ``base``) or bytes, or why it cannot be used."""
    if isinstance(value, dict) and value.get("bytes"):
        return {"bytes": value["bytes"], "path": value.get("path")}, None
    if not isinstance(value, str) or not value.strip():
        return None, f"no image path: got {value!r}"
    path = base / value
    if within is not None and not _inside(path, within):
        return None, f"path outside the data folder: {value} (refused, not read)"
    return str(path), None


def _table(
    table: Path,
    image_column: str | None,
    caption_column: str | None,
    within: Path | None,
    mask_column: str | None = None,
) -> datasets.Dataset:
    """A CSV / JSONL / JSON / Parquet table of image paths, relative to its folder, and captions
    (and, with ``mask_column``, loss-mask paths: an empty cell means no mask).

    Args:
        within: where every image must lie (a data folder's own metadata file), or None.
    """
    try:
        columns, rows = read_table(table)
    except TableError as err:
        raise SourceError(str(err)) from err
    if not rows.count:
        raise SourceError(f"{table}: no rows")
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image", str(table))
    text = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", str(table))
    if mask_column:
        _pick(columns, mask_column, (), "mask", str(table))
    images, texts, skips, masks = [], [], [], []
    for row in rows:
        cell, problem = _image_cell(row.cells.get(image), table.parent, within) if not row.problem else (None, None)
        mask = None
        if mask_column and not row.problem and not problem and row.cells.get(mask_column):
            mask, problem = _image_cell(row.cells[mask_column], table.parent, within)
            problem = problem and f"mask: {problem}"
        problem = row.problem or problem
        images.append(cell)
        masks.append(mask)
        texts.append(None if problem else row.cells.get(text))
        skips.append(f"{problem} ({row.where})" if problem else None)
    return _rows(images, texts, skips, masks if mask_column else None)


def caption_file(path: Path) -> tuple[str | None, str | None]:
    """The caption beside an image (None when there is none), or why it cannot be read."""
    caption = path.with_suffix(".txt")
    if not caption.is_file():
        return None, None
    try:
        data = caption.read_bytes()
    except OSError as err:
        return None, f"unreadable caption file: {caption.name}: {err.strerror or err}"
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as err:
        return None, f"caption file not UTF-8: {caption.name} (byte {data[err.start]:#04x} at {err.start})"


def is_paired_mask(path: Path) -> bool:
    """Whether ``path`` is the loss mask of an image beside it (``cat_mask.png`` next to ``cat.*``)."""
    if not path.stem.endswith(MASK_SUFFIX):
        return False
    stem = path.stem[: -len(MASK_SUFFIX)]
    return any(path.with_name(stem + ext).is_file() for ext in IMAGE_EXTENSIONS)


def mask_beside(image: str | None) -> str | None:
    """The same-name ``<stem>_mask.png`` beside an image file, if there is one."""
    if not image:
        return None
    path = Path(image)
    mask = path.with_name(path.stem + MASK_SUFFIX + ".png")
    return str(mask) if mask.is_file() else None


def _folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive), without the loss masks paired with them."""
    found = (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return [p for p in found if not is_paired_mask(p)]


def _text_folder(folder: Path) -> datasets.Dataset:
    """Images with a same-name .txt caption beside each (recursive); missing captions are None."""
    images = _folder_images(folder)
    if not images:
        raise SourceError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) and no metadata file")
    texts, skips = zip(*(caption_file(p) for p in images), strict=True)
    return _rows([str(p) for p in images], list(texts), list(skips))


def _with_unlisted(ds: datasets.Dataset, folder: Path) -> datasets.Dataset:
    """Images in the folder that the metadata file does not list, added with no caption, so that
    the skip report names them instead of leaving them out unseen."""
    listed = {str(Path(cell["path"]).resolve()) for cell in ds["image"] if cell and cell.get("path")}
    unlisted = [str(p) for p in _folder_images(folder) if str(p.resolve()) not in listed]
    if not unlisted:
        return ds
    nothing = [None] * len(unlisted)
    columns = {column: nothing for column in ds.features}
    columns["image"] = unlisted
    extra = datasets.Dataset.from_dict(columns, features=ds.features)
    return datasets.concatenate_datasets([ds, extra])


def _holds_image_bytes(path: Path, image_column: str | None) -> bool:
    """Whether a Parquet file's image column holds the images themselves (not paths)."""
    import pyarrow
    import pyarrow.parquet

    try:
        schema = pyarrow.parquet.read_schema(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise SourceError(f"{path}: not a readable Parquet file: {err}") from err
    column = _pick(schema.names, image_column, IMAGE_COLUMNS, "image", str(path))
    kind = schema.field(column).type
    return not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind))


def _parquet_with_bytes(
    path: Path, image_column: str | None, caption_column: str | None, mask_column: str | None
) -> datasets.Dataset:
    """A Parquet file of image bytes, converted once to ``datasets``' Arrow cache and read from it
    memory-mapped, row by row: the images are never all in memory (a table of paths is read
    whole, as it is small)."""
    try:
        ds = datasets.Dataset.from_parquet(str(path))
    except (OSError, ValueError) as err:
        raise SourceError(f"{path}: not a readable Parquet file: {err}") from err
    return _normalise(ds, image_column, caption_column, str(path), mask_column)


def _split(ds: datasets.Dataset | datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"{source}: no split {split!r}; splits are {list(ds)}")
        return ds[split]
    return ds


def _streamed(
    name: str, split: str, image_column: str | None, caption_column: str | None, mask_column: str | None
) -> datasets.IterableDataset:
    """A Hub dataset or a local data folder read as a stream (``datasets``' ``IterableDataset``):
    rows arrive one by one, nothing is downloaded or converted whole."""
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise SourceError(f"could not stream {name!r}: {str(err).splitlines()[0]}") from err
    if ds.features is None:
        raise SourceError(f"{name}: the stream does not declare its columns; name them in the dataset's card")
    return _normalise(ds, image_column, caption_column, name, mask_column)


def load_source(
    source: str | os.PathLike,
    caption_column: str | None = None,
    image_column: str | None = None,
    split: str = "train",
    mask_column: str | None = None,
    streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load any supported source as a ``Dataset`` with ``image`` (undecoded), ``text`` and ``skip`` columns.

    Args:
        source: a folder, a CSV/JSONL/Parquet file, a ``save_to_disk`` folder or a Hub dataset id.
        caption_column: the caption column (default: the first of text, caption, prompt).
        image_column: the image column of a table or Hub dataset (default: image, file_name, ...).
        split: the split of a Hub dataset or of a saved ``DatasetDict``.
        mask_column: a table's or dataset's column of loss masks, kept as ``mask`` (undecoded);
            folders need none: a same-name ``<stem>_mask.png`` is found at use (`mask_beside`).
        streaming: read a Hub dataset or a local imagefolder as a stream
            (``datasets.IterableDataset``, `_streamed`) instead of loading or converting it; a
            table file is read as without it (row by row already).

    Raises:
        SourceError: the source is missing, empty or lacks an image or caption column.
    """
    name = str(source)
    path = Path(source)
    if streaming and not path.is_file():  # a table file is read row by row already
        return _streamed(name, split, image_column, caption_column, mask_column)
    tars = tar_shards(name)
    if tars is not None:
        if mask_column:
            raise SourceError(f"{name}: data.mask_column is not read from tar shards")
        return load_tar_shards(tars)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            try:
                ds = _split(datasets.load_from_disk(str(path)), split, name)
            except (OSError, ValueError, KeyError) as err:
                raise SourceError(f"{name}: a broken save_to_disk folder: {err}") from err
            return _normalise(ds, image_column, caption_column, name, mask_column)
        metadata = [path / f"metadata{ext}" for ext in METADATA_SUFFIXES if (path / f"metadata{ext}").is_file()]
        if metadata:
            table = _table(metadata[0], image_column, caption_column, within=path, mask_column=mask_column)
            return _with_unlisted(table, path)
        if mask_column:
            raise SourceError(f"{name}: data.mask_column needs a table or dataset (a folder's masks: <name>_mask.png)")
        return _text_folder(path)
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise SourceError(f"{name}: a file source must be one of {list(TABLE_SUFFIXES)}")
        if path.suffix.lower() == ".parquet" and _holds_image_bytes(path, image_column):
            return _parquet_with_bytes(path, image_column, caption_column, mask_column)
        return _table(path, image_column, caption_column, within=None, mask_column=mask_column)
    # Not a file or folder here: a Hub id ("name" or "owner/name") or a mistyped path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise SourceError(f"data source not found: {name}")
    try:
        ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise SourceError(f"could not load the Hub dataset {name!r}: {str(err).splitlines()[0]}") from err
    return _normalise(ds, image_column, caption_column, name, mask_column)


def captions_of(value: str | list | None) -> list[str]:
    """A ``text`` cell as a list of non-empty captions (one string, or several)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if t is not None and str(t).strip()]


def describe(cell: dict, row: int) -> str:
    """How a report names an image: its path (a tar member's: ``shard.tar:member``), else its row."""
    path = cell.get("path") if isinstance(cell, dict) else None
    if path and cell.get("member"):
        return f"{path}:{cell['member']}"
    return path or f"row {row}"
