"""Reading training data: TSV / CSV / JSONL tables with named columns, Hugging Face data sets, and a few
built-in sources.

Every row that cannot be used (a field count that differs from the header's, a missing column, an empty
label, a label outside the known set: see labels.py) is reported with its file and line number: the run
either fails on the first one (``bad_rows: fail``) or skips them and reports how many and which
(``bad_rows: skip``). Nothing is dropped silently. A file that cannot be read (not UTF-8, a field over
the csv field-size limit, a damaged ``.gz``) is an error naming the file, and the line where there is one.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_DATA = Path(__file__).resolve().parents[3] / "examples" / "data"


class DataError(ValueError):
    """A data file or row is unusable; the message names the file and line."""


@dataclass
class Table:
    """Rows as dicts plus the line number each came from (header = line 1)."""

    source: str
    rows: list[dict[str, Any]]
    lines: list[int]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    problems: dict[int, str] = field(default_factory=dict)  # line -> why the row is malformed (see read_table)


def builtin_path(name: str) -> str:
    """``builtin:sst2/train`` -> the project's copy of the SST-2 slice (examples/data/sst2/train.tsv)."""
    rel = name.removeprefix("builtin:")
    root = Path(os.environ.get("PEFTKIT_DATA", REPO_DATA))
    path = root / f"{rel}.tsv"
    if not path.is_file():
        raise DataError(f"{name}: no built-in data set at {path} (set PEFTKIT_DATA to the folder holding it)")
    return str(path)


HF_PREFIX = "hf:"


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf:PATH[:CONFIG]@SPLIT`` -> (path, config name, split). PATH is a hub id (``stanfordnlp/sst2``) or a
    local folder (data files, or a data set written by ``save_to_disk``)."""
    body = source.removeprefix(HF_PREFIX)
    path, at, split = body.rpartition("@")
    if not at or not path or not split:
        raise DataError(f"{source}: expected hf:PATH[:CONFIG]@SPLIT, e.g. hf:stanfordnlp/sst2@train")
    path, _, config = path.partition(":")
    return path, config or None, split


def read_hf(source: str, limit: int | None = None) -> Table:
    """Rows of a Hugging Face data set split; a row's "line" is its 1-based row number.

    Class-label columns come back as their names (``negative`` / ``positive``), so the run's label set reads
    like the data set's. Hub ids need the network (and the ``datasets`` package)."""
    path, config, split = parse_hf(source)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading Hugging Face data sets needs the datasets package "
                        "(pip install datasets)") from None
    try:
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("dataset_dict.json", "state.json")):
            data = datasets.load_from_disk(path)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{source}: no split {split!r}; the data set has {sorted(data)}")
                data = data[split]
        else:
            data = datasets.load_dataset(path, config, split=split)
    except DataError:
        raise
    except Exception as exc:  # the hub is unreachable, the id or split is unknown, a file is unreadable ...
        raise DataError(f"{source}: cannot load the data set: {type(exc).__name__}: {exc}") from None
    if limit:
        data = data.select(range(min(limit, len(data))))
    names = {k: f.names for k, f in data.features.items() if isinstance(f, datasets.ClassLabel)}
    rows = []
    for row in data:
        for key, labels in names.items():
            if row.get(key) is not None and 0 <= row[key] < len(labels):
                row[key] = labels[row[key]]
        rows.append(row)
    return Table(source, rows, list(range(1, len(rows) + 1)))


def read_table(path: str, limit: int | None = None) -> Table:
    """Rows of a .tsv, .csv or .jsonl(.gz) file (the format follows the extension), or of a Hugging Face
    data set split (``hf:PATH[:CONFIG]@SPLIT``).

    The file must be UTF-8 (a byte order mark is allowed). A row whose field count differs from the header's
    (an unquoted comma in a CSV, a tab inside a TSV field, a missing or extra trailing field) is kept with its
    problem in ``Table.problems``; :func:`check_columns` fails on it or skips it, as ``data.bad_rows`` says."""
    if path.startswith(HF_PREFIX):
        return read_hf(path, limit)
    if path.startswith("builtin:"):
        path = builtin_path(path)
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl") or name.endswith(".json"):
        return _read_jsonl(path, limit)
    if name.endswith(".tsv") or name.endswith(".csv"):
        return _read_delimited(path, limit, tsv=name.endswith(".tsv"))
    raise DataError(f"{path}: unknown format (expected .tsv, .csv or .jsonl)")


def _text_lines(path: str) -> Iterator[str]:
    """The file's lines decoded as UTF-8 one by one, so an error names its line; ``.gz`` is decompressed."""
    gz = path.endswith(".gz")
    lineno = 0
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                                    f"{exc.start + 1} of the line); save the file as UTF-8") from None
                yield text.removeprefix("\ufeff") if lineno == 1 else text
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        if not gz or isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        after = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: not a readable gzip file{after} ({type(exc).__name__}: {exc})") from None


def _read_jsonl(path: str, limit: int | None) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for lineno, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(row)
        lines.append(lineno)
        if limit and len(rows) >= limit:
            break
    return Table(path, rows, lines)


def _read_delimited(path: str, limit: int | None, tsv: bool) -> Table:
    kw: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    hint = "a tab inside a field?" if tsv else "a comma inside an unquoted field? quote it"
    reader = csv.reader(_text_lines(path), **kw)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    problems: dict[int, str] = {}
    header: list[str] | None = None
    end = 0  # the last line of the previous record (a quoted field may span lines)
    try:
        for fields in reader:
            line, end = end + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue  # a blank line
            if header is None:
                header = fields
                twice = sorted({c for c in header if header.count(c) > 1})
                if twice:
                    raise DataError(f"{path}:{line}: column {twice[0]!r} appears more than once in the header")
                continue
            if len(fields) != len(header):
                problems[line] = f"{len(fields)} fields, but the header has {len(header)} ({hint})"
            rows.append(dict(zip(header, fields)))
            lines.append(line)
            if limit and len(rows) >= limit:
                break
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    if header is None:
        raise DataError(f"{path}: empty file (expected a header line naming the columns)")
    return Table(path, rows, lines, problems=problems)


def check_columns(table: Table, columns: list[str], field_names: list[str], bad_rows: str) -> Table:
    """Keep well-formed rows whose ``columns`` are present and non-empty; report the others by line number."""
    keep_rows, keep_lines, skipped = [], [], list(table.skipped)
    for row, line in zip(table.rows, table.lines):
        problem = table.problems.get(line)
        missing = [c for c, f in zip(columns, field_names) if row.get(c) in (None, "")]
        if problem is None and missing:
            problem = f"missing {field_names[columns.index(missing[0])]} column {missing[0]!r}"
        if problem:
            bad_row(table, line, problem, bad_rows, skipped)
            continue
        keep_rows.append(row)
        keep_lines.append(line)
    return Table(table.source, keep_rows, keep_lines, skipped)


def bad_row(table: Table, line: int, problem: str, bad_rows: str, skipped: list[tuple[int, str]]) -> None:
    """Fail on an unusable row (``bad_rows: fail``), or record it in ``skipped``."""
    if bad_rows == "fail":
        raise DataError(f"{table.source}:{line}: {problem} (set data.bad_rows=skip to skip such rows)")
    skipped.append((line, problem))


def report_skipped(table: Table) -> str | None:
    if not table.skipped:
        return None
    shown = ", ".join(f"line {line} ({why})" for line, why in table.skipped[:5])
    more = f" and {len(table.skipped) - 5} more" if len(table.skipped) > 5 else ""
    return f"{table.source}: skipped {len(table.skipped)} rows: {shown}{more}"
