"""CSV, JSON Lines, JSON and Parquet tables read row by row, so that one bad row is reported, not fatal.

``datasets``' ``csv`` and ``json`` builders stop on the first row they cannot parse (a line
that is not JSON, a CSV row with a stray field, bytes that are not UTF-8) and take the whole
table down with a traceback. Here each such row becomes a `Row` with a ``problem`` and the rest
of the table is read; only a table that cannot be read at all raises `TableError`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


class TableError(InputError):
    """A table that cannot be read at all; the message names the file and why."""


@dataclass
class Row:
    """One row of a table: its cells, or why it cannot be used (``where`` names its line)."""

    where: str
    cells: dict = field(default_factory=dict)
    problem: str | None = None


def _has_bad_bytes(value: object) -> bool:
    """Text decoded with ``surrogateescape`` keeps bytes that are not UTF-8 as lone surrogates."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, list):
        return any(_has_bad_bytes(v) for v in value)
    if isinstance(value, dict):
        return any(_has_bad_bytes(k) or _has_bad_bytes(v) for k, v in value.items())
    return False


def _checked(row: Row) -> Row:
    if row.problem is None and _has_bad_bytes(row.cells):
        return Row(row.where, {}, "bad table row: text that is not UTF-8")
    return row


def _json_lines(text: str, name: str) -> Iterator[Row]:
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name} line {number}"
        if not line.strip():
            continue
        try:
            cells = json.loads(line)
        except json.JSONDecodeError as err:
            yield Row(where, {}, f"bad table row: not valid JSON ({err.msg}, column {err.colno})")
            continue
        if not isinstance(cells, dict):
            yield Row(where, {}, f"bad table row: a JSON {type(cells).__name__}, not an object")
            continue
        yield _checked(Row(where, cells))


def _json_array(text: str, name: str) -> Iterator[Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise TableError(f"{name}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(items, list):
        raise TableError(f"{name}: a JSON table must be a list of objects or one object per line")
    for i, item in enumerate(items):
        if isinstance(item, dict):
            yield _checked(Row(f"{name} item {i}", item))
        else:
            yield Row(f"{name} item {i}", {}, f"bad table row: a JSON {type(item).__name__}, not an object")


def _csv(text: str, name: str) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise TableError(f"{name}: empty CSV file (no header row)")
        if _has_bad_bytes(header):
            raise TableError(f"{name}: the header row is not UTF-8 text")
        for cells in reader:
            where = f"{name} line {reader.line_num}"
            if not cells:
                continue
            if len(cells) != len(header):
                yield Row(where, {}, f"bad table row: {len(cells)} fields where the header has {len(header)}")
                continue
            yield _checked(Row(where, dict(zip(header, cells, strict=True))))
    except csv.Error as err:
        raise TableError(f"{name}: unreadable CSV at line {reader.line_num}: {err}") from err


def _parquet(path: Path, name: str) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        row = 0
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches():
            for cells in batch.to_pylist():
                yield Row(f"{name} row {row}", cells)
                row += 1
    except (pyarrow.ArrowException, OSError) as err:
        raise TableError(f"{name}: not a readable Parquet file: {err}") from err


class Rows:
    """A table's rows, parsed anew on each pass, so that no pass holds them all (a table of a
    million paths is read twice rather than kept); ``count`` is how many there are."""

    def __init__(self, produce: Callable[[], Iterator[Row]]):
        self._produce = produce
        self.count = 0

    def __iter__(self) -> Iterator[Row]:
        return self._produce()


def read_table(path: str | Path) -> tuple[list[str], Rows]:
    """The column names (in first-seen order) and the rows of a table file.

    Raises:
        TableError: the file cannot be read at all (not a table, no header, broken Parquet).
    """
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise TableError(f"{path}: a table must be one of {list(TABLE_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            rows = Rows(lambda: _parquet(path, name))
        else:
            # Bytes that are not UTF-8 survive as surrogates and mark only their own row.
            text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
            if suffix == ".csv":
                rows = Rows(lambda: _csv(text, name))
            elif suffix == ".json" and text.lstrip().startswith("["):
                rows = Rows(lambda: _json_array(text, name))
            else:
                rows = Rows(lambda: _json_lines(text, name))
    except OSError as err:
        raise TableError(f"{path}: cannot read it: {err.strerror or err}") from err
    columns: dict[str, None] = {}
    for row in rows:
        rows.count += 1
        columns.update(dict.fromkeys(row.cells))
    return list(columns), rows
