"""The import-system side of serving ``peft``: a finder for the facade modules and a metadata record.

Tools check for peft with ``importlib.util.find_spec("peft")`` and read its version with
``importlib.metadata.version("peft")``; both ask the finders on ``sys.meta_path``, so one finder placed
first answers both, whether or not the real package is on disk.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import types
from collections.abc import Iterator
from typing import Any

from .facade import FACADES, PEFT_API_VERSION, build_module


class _FacadeLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return build_module(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:  # built complete in create_module
        return None


class _PeftDistribution(importlib.metadata.Distribution):
    """``importlib.metadata`` record of the served ``peft``: name and version only."""

    _METADATA = (
        f"Metadata-Version: 2.1\nName: peft\nVersion: {PEFT_API_VERSION}\n"
        "Summary: the peft API, served by peftkit\n"
    )

    def read_text(self, filename: str) -> str | None:
        return self._METADATA if filename == "METADATA" else None

    def locate_file(self, path: Any) -> Any:
        return path


class PeftFinder(importlib.abc.MetaPathFinder):
    """Answers ``import peft`` and ``import peft.<submodule>`` for the modules in :data:`FACADES`."""

    _loader = _FacadeLoader()
    serves_peft = True  # what serving.serving_as_peft looks for

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" and not fullname.startswith("peft."):
            return None
        if fullname not in FACADES:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: peftkit serves `peft` in this process and has no counterpart of "
                f"{fullname}; the served modules are: {', '.join(sorted(FACADES))}",
                name=fullname,
            )
        return importlib.machinery.ModuleSpec(fullname, self._loader, is_package=True)

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context = importlib.metadata.DistributionFinder.Context()
    ) -> Iterator[importlib.metadata.Distribution]:
        name = (context.name or "").replace("-", "_").lower()
        if name == "peft":
            yield _PeftDistribution()
