"""Reading training data: TSV / CSV / JSONL tables with named columns, Hugging Face data sets, and a few
built-in sources.

Every row that cannot be used (a missing column, an empty label, a label outside the known set) is
reported with its file and line number: the run either fails on the first one (``bad_rows: fail``) or
skips them and reports how many and which (``bad_rows: skip``). Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
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
    data set split (``hf:PATH[:CONFIG]@SPLIT``)."""
    if path.startswith(HF_PREFIX):
        return read_hf(path, limit)
    if path.startswith("builtin:"):
        path = builtin_path(path)
    name = path[:-3] if path.endswith(".gz") else path
    opener = gzip.open if path.endswith(".gz") else open
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if name.endswith(".jsonl") or name.endswith(".json"):
            for lineno, line in enumerate(f, 1):
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
        elif name.endswith(".tsv") or name.endswith(".csv"):
            kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if name.endswith(".tsv") else {}
            reader = csv.DictReader(f, **kw)
            for row in reader:
                rows.append({k: v for k, v in row.items() if k is not None})
                lines.append(reader.line_num)
                if limit and len(rows) >= limit:
                    break
        else:
            raise DataError(f"{path}: unknown format (expected .tsv, .csv or .jsonl)")
    return Table(path, rows, lines)


def check_columns(table: Table, columns: list[str], field_names: list[str], bad_rows: str) -> Table:
    """Keep rows whose ``columns`` are present and non-empty; report the others by line number."""
    keep_rows, keep_lines, skipped = [], [], list(table.skipped)
    for row, line in zip(table.rows, table.lines):
        missing = [c for c, f in zip(columns, field_names) if row.get(c) in (None, "")]
        if missing:
            problem = f"missing {field_names[columns.index(missing[0])]} column {missing[0]!r}"
            if bad_rows == "fail":
                raise DataError(f"{table.source}:{line}: {problem} (set data.bad_rows=skip to skip such rows)")
            skipped.append((line, problem))
            continue
        keep_rows.append(row)
        keep_lines.append(line)
    return Table(table.source, keep_rows, keep_lines, skipped)


def label_set(table: Table, column: str) -> list[str]:
    """The sorted label vocabulary; integer-looking labels sort numerically ("2" before "10")."""
    labels = {str(r[column]).strip() for r in table.rows}
    if all(s.lstrip("-").isdigit() for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def encode_labels(table: Table, column: str, labels: list[str], bad_rows: str) -> tuple[Table, list[int]]:
    """Label indices in ``labels``; a label outside the set fails or is skipped with its line number."""
    index = {name: i for i, name in enumerate(labels)}
    rows, lines, ys, skipped = [], [], [], list(table.skipped)
    for row, line in zip(table.rows, table.lines):
        value = str(row[column]).strip()
        if value not in index:
            problem = f"label {value!r} is not one of the known labels {labels}"
            if bad_rows == "fail":
                raise DataError(f"{table.source}:{line}: {problem} (set data.bad_rows=skip to skip such rows)")
            skipped.append((line, problem))
            continue
        rows.append(row)
        lines.append(line)
        ys.append(index[value])
    return Table(table.source, rows, lines, skipped), ys


def report_skipped(table: Table) -> str | None:
    if not table.skipped:
        return None
    shown = ", ".join(f"line {line} ({why})" for line, why in table.skipped[:5])
    more = f" and {len(table.skipped) - 5} more" if len(table.skipped) > 5 else ""
    return f"{table.source}: skipped {len(table.skipped)} rows: {shown}{more}"
