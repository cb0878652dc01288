"""Atomic file writes: a crash never leaves a half-written file under the final name, and a group of files
(an adapter's config and weights) is replaced as one.

One file: written to a temporary next to it, fsynced, renamed over it. Several files sharing a folder with
things that are not ours (a tokenizer, trainer files, other adapters' subfolders) cannot be swapped in one
rename, so ``commit_files`` keeps a small record, written atomically once every new file is complete (the
commit point), that names the temporaries and fingerprints (size, mtime) the old and new files. Then the
temporaries are renamed into place and the record removed. A process killed in between leaves the record:
``resolve_files`` reads through it (the new files, whichever are still temporaries), and the next
``commit_files`` into the folder finishes the renames first. A record whose files changed since (someone
else wrote the folder) is stale and ignored. Temporaries (``.peftkit-tmp-*``) of a killed write are removed
by the next ``commit_files`` into that folder.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable

TMP_PREFIX = ".peftkit-tmp-"
RECORD = ".peftkit-commit.json"  # an interrupted commit_files: what still has to be renamed into place


def write_temp(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a new temporary next to ``path``, fsync it, and return its path (not renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse it
        pass
    finally:
        os.close(fd)


# -- a group of files replaced together ----------------------------------------------------------------


def commit_files(folder: str, writes: dict[str, Callable[[str], None]], remove: Iterable[str] = ()) -> None:
    """Replace the files ``writes`` names in ``folder`` (``write(tmp)`` fills each) and delete ``remove``, as one
    change for readers that go through ``resolve_files``. Nothing else in the folder is touched, except what a
    previous, killed call left (finished, then its temporaries removed). One writer per folder at a time."""
    os.makedirs(folder, exist_ok=True)
    names = [*writes, *remove]
    recover(folder, names)
    temps: dict[str, str] = {}
    try:
        for name, write in writes.items():
            temps[name] = write_temp(os.path.join(folder, name), write)
        record = {
            "files": {name: {"temp": os.path.basename(tmp), "new": _stamp(tmp),
                             "old": _stamp(os.path.join(folder, name))} for name, tmp in temps.items()},
            "remove": {name: _stamp(os.path.join(folder, name)) for name in remove
                       if os.path.exists(os.path.join(folder, name))},
        }
        atomic_write_text(os.path.join(folder, RECORD), json.dumps(record))  # the commit point
    except BaseException:
        for tmp in temps.values():
            _unlink(tmp)
        raise
    _finish(folder, record)


def resolve_files(folder: str, names: Iterable[str]) -> dict[str, str | None]:
    """Where each of ``names`` is to be read: the file itself, the temporary of a committed but unfinished
    ``commit_files``, or None when absent (or deleted by that commit). Never writes."""
    out: dict[str, str | None] = {}
    for name in names:
        path = os.path.join(folder, name)
        out[name] = path if os.path.exists(path) else None
    record = _read_record(folder)
    pending = _pending(folder, record) if record is not None else None
    out.update({k: v for k, v in (pending or {}).items() if k in out})  # a temporary may vanish: caller retries
    return out


def recover(folder: str, names: Iterable[str]) -> None:
    """Finish an interrupted ``commit_files`` in ``folder`` (or drop its stale record), then remove leftover
    temporaries of ``names``: peftkit's (``.peftkit-tmp-*-<name>``) and older versions' (``.tmp-XXXXXXXX-<name>``)."""
    record = _read_record(folder)
    if record is not None and _pending(folder, record) is not None:
        _finish(folder, record)
    _unlink(os.path.join(folder, RECORD))  # stale or unreadable
    wanted = "|".join(re.escape(n) for n in [*names, RECORD])
    stale = re.compile(rf"^(?:{re.escape(TMP_PREFIX)}.+|\.tmp-[a-z0-9_]{{8}})-(?:{wanted})$")
    for entry in os.listdir(folder):
        if stale.match(entry) and os.path.isfile(os.path.join(folder, entry)):
            _unlink(os.path.join(folder, entry))


def _finish(folder: str, record: dict) -> None:
    """Rename the record's temporaries into place, delete what it removes, then drop the record."""
    for name, entry in record["files"].items():
        tmp = os.path.join(folder, entry["temp"])
        if os.path.exists(tmp):
            os.replace(tmp, os.path.join(folder, name))
    for name in record["remove"]:
        _unlink(os.path.join(folder, name))
    fsync_dir(folder)
    _unlink(os.path.join(folder, RECORD))
    fsync_dir(folder)


def _pending(folder: str, record: dict) -> dict[str, str | None] | None:
    """name -> where the committed new content is (None: deleted); None when the record is stale."""
    out: dict[str, str | None] = {}
    for name, entry in record["files"].items():
        tmp, final = os.path.join(folder, entry["temp"]), os.path.join(folder, name)
        if _stamp(tmp) == entry["new"] and _stamp(final) == entry["old"]:
            out[name] = tmp  # not renamed yet; the file under its name is still the old one
        elif _stamp(final) == entry["new"] and not os.path.exists(tmp):
            out[name] = final  # already renamed
        else:
            return None  # the folder was written since: the record no longer describes it
    for name, old in record["remove"].items():
        now = _stamp(os.path.join(folder, name))
        if now is not None and now != old:
            return None
        out[name] = None
    return out


def _read_record(folder: str) -> dict | None:
    path = os.path.join(folder, RECORD)
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        if not isinstance(record.get("files"), dict) or not isinstance(record.get("remove"), dict):
            raise ValueError("unexpected layout")
        for entry in record["files"].values():
            if os.path.basename(entry["temp"]) != entry["temp"] or not entry["temp"].startswith(TMP_PREFIX):
                raise ValueError(f"unexpected temporary name {entry['temp']!r}")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"{path}: ignoring an unreadable record of an interrupted save ({err})", stacklevel=3)
        return None


def _stamp(path: str) -> list[int] | None:
    """Size and modification time (ns) of a file, None when it does not exist: what tells files apart here."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
