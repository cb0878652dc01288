"""Models built on first use (``clip-tiny-digits``, ``unet-tiny-digits``, ``llava-smollm2``) and cached under
``$PEFTKIT_CACHE``: where a build lives, the key of its settings, and its publication in one rename."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

PRETRAIN_RECORD = "peftkit_pretrain.json"  # what a build was made from, beside its weights


def cache_root() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def settings_key(version: int, settings: Any) -> str:
    """A hash of everything a build's weights depend on: its settings (a dataclass) and the procedure's version."""
    blob = json.dumps({"version": version, **dataclasses.asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class BuildSettings:
    """Base of a cached build's settings (a frozen dataclass): ``key()`` hashes its fields with the procedure's
    ``VERSION`` (a class attribute, so not a field), which names the build's cache folder."""

    VERSION: ClassVar[int] = 1

    def key(self) -> str:
        """A hash of everything the weights depend on (the settings and the procedure's version)."""
        return settings_key(self.VERSION, self)


def publish(folder: Path, write: Callable[[Path], None], record: dict[str, Any],
            is_built: Callable[[Path], bool]) -> None:
    """Write a build into ``folder`` at once: ``write`` fills a temporary sibling folder, the record joins it, then
    one rename. When another process finished the same build first, its folder is kept."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / PRETRAIN_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_built(folder):
            raise
