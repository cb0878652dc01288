"""Class labels of classification data: declared (``data.labels``) or inferred from the training rows only.

A label is a string or an integer (``1`` and ``"1"`` are the same class). Anything else (``1.0``, ``true``, a
list) is a bad row, never a class of its own. Inferred from training rows, a label that looks like a typo or a
case variant of a much more frequent one (``postive`` next to 40 ``positive``, ``Positive`` next to
``positive``) is a bad row too: it would otherwise add a class silently. Declaring ``data.labels`` turns the
guessing off: the declared list is the label set, in that order. A test row whose label is outside the set
is always an error (evaluating on a class the model cannot predict is not a skippable row).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any

from .data import DataError, Table, bad_row

TYPO_RATIO = 10  # a typo candidate is at most 1/TYPO_RATIO as frequent as the label it resembles
TYPO_SIMILARITY = 0.8  # difflib ratio, case-insensitive


def label_text(value: Any) -> str:
    """The label as the string the label set uses; ``ValueError`` (the row's problem) for other types."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        return str(value)
    elif isinstance(value, str):
        return value.strip()
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, (list, tuple)):
        kind = "a list"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        kind = f"a {type(value).__name__}"
    raise ValueError(f"label {value!r} is {kind}; labels must be strings or integers")


def _texts(table: Table, column: str, bad_rows: str) -> tuple[Table, list[str]]:
    """Rows whose label is a usable string or integer, and their label texts."""
    rows, lines, texts, skipped = [], [], [], list(table.skipped)
    for row, line in zip(table.rows, table.lines):
        try:
            text = label_text(row.get(column))
        except ValueError as exc:
            bad_row(table, line, str(exc), bad_rows, skipped)
            continue
        if not text:
            bad_row(table, line, f"missing label column {column!r}", bad_rows, skipped)
            continue
        rows.append(row)
        lines.append(line)
        texts.append(text)
    return Table(table.source, rows, lines, skipped), texts


def sort_labels(labels: set[str] | list[str]) -> list[str]:
    """Sorted; integer-looking labels sort numerically ("2" before "10")."""
    if all(s.lstrip("-").isdigit() for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _fold(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.casefold())


def suspicious_labels(texts: list[str], lines: list[int]) -> dict[str, str]:
    """Labels that look like a typo or a case variant of a more frequent label -> the problem to report."""
    count = Counter(texts)
    first = {}
    for text, line in zip(texts, lines):
        first.setdefault(text, line)
    out: dict[str, str] = {}
    for a in count:
        for b in count:
            if a == b or (count[a], -first[a]) >= (count[b], -first[b]):
                continue  # only the rarer of two labels (the later one on a tie) is suspicious
            rows = f"{count[a]} row{'s' if count[a] > 1 else ''} against {count[b]}"
            if _fold(a) == _fold(b):
                out[a] = f"label {a!r} differs from {b!r} only in case or punctuation ({rows})"
            elif (count[a] * TYPO_RATIO <= count[b] and min(len(a), len(b)) >= 4
                  and re.sub(r"\d+", "", a) != re.sub(r"\d+", "", b)
                  and difflib.SequenceMatcher(None, a.casefold(), b.casefold()).ratio() >= TYPO_SIMILARITY):
                out[a] = f"label {a!r} looks like a typo of {b!r} ({rows})"
            else:
                continue
            out[a] += "; fix the row, or list every class in data.labels to keep it as a class"
            break
    return out


def infer_labels(table: Table, column: str, bad_rows: str) -> tuple[Table, list[str]]:
    """The label set of training rows (no ``data.labels``): bad labels and suspected typos are bad rows."""
    table, texts = _texts(table, column, bad_rows)
    suspicious = suspicious_labels(texts, table.lines)
    rows, lines, kept, skipped = [], [], [], list(table.skipped)
    for row, line, text in zip(table.rows, table.lines, texts):
        if text in suspicious:
            bad_row(table, line, suspicious[text], bad_rows, skipped)
            continue
        rows.append(row)
        lines.append(line)
        kept.append(text)
    return Table(table.source, rows, lines, skipped), sort_labels(set(kept))


def encode_labels(table: Table, column: str, labels: list[str], bad_rows: str, *, origin: str = "",
                  strict: bool = False) -> tuple[Table, list[int]]:
    """Label indices in ``labels``. A badly typed label fails or is skipped (``bad_rows``) with its line; so is
    a label outside the set, unless ``strict`` (test data), where it always fails. ``origin`` says where the
    set came from, for the message."""
    index = {name: i for i, name in enumerate(labels)}
    table, texts = _texts(table, column, bad_rows)
    rows, lines, ys, skipped = [], [], [], list(table.skipped)
    for row, line, text in zip(table.rows, table.lines, texts):
        if text not in index:
            where = f" ({origin})" if origin else ""
            problem = f"label {text!r} is not one of the known labels {labels}{where}"
            if strict:
                raise DataError(f"{table.source}:{line}: {problem}")
            bad_row(table, line, problem, bad_rows, skipped)
            continue
        rows.append(row)
        lines.append(line)
        ys.append(index[text])
    return Table(table.source, rows, lines, skipped), ys
