"""peftkit seen as ``peft`` by the tools that drive PEFT models.

transformers' Trainer, trl, diffusers and accelerate recognise a PEFT model by ``isinstance`` against the
classes they import from ``peft``, and import peft's functions to inject, save and load adapters. So that
they drive a peftkit model exactly as a peft model, peftkit can *serve* the import name ``peft``: a finder
at the front of ``sys.meta_path`` answers ``import peft`` (and the submodules the tools import, see
:mod:`.facade`) with modules whose names are peftkit's objects, and ``importlib.metadata`` reports a
``peft`` distribution of the peft API version peftkit follows (:data:`PEFT_API_VERSION`).

When it is on:

- automatically on ``import peftkit`` when the real ``peft`` is not installed (peft is never a peftkit
  dependency, so this is the usual case);
- when the real ``peft`` is installed too, only when asked: ``peftkit.serve_as_peft()`` before the tools
  are imported, or the environment variable ``PEFTKIT_SERVE_AS_PEFT=1``. Then ``import peft`` gives
  peftkit everywhere in the process; the real package stays on disk, untouched. ``PEFTKIT_SERVE_AS_PEFT=0``
  turns the automatic case off.

Import peftkit before the tools bind ``peft`` names (``from transformers import Trainer``, ``import trl``
...): they read ``is_peft_available()`` when their modules load. :func:`serve_as_peft` warns when a tool
module that binds peft names is already imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

from ..serving import ENV_VAR, TOOL_MODULES, serving_as_peft, warn_if_tools_see_real_peft
from .facade import PEFT_API_VERSION
from .finder import PeftFinder

__all__ = ["ENV_VAR", "PEFT_API_VERSION", "serve_as_peft", "serving_as_peft", "warn_if_tools_see_real_peft"]


def serve_as_peft() -> None:
    """Answer ``import peft`` with peftkit from now on, in this process.

    Call it before importing transformers' Trainer, trl or diffusers' loaders (or set
    ``PEFTKIT_SERVE_AS_PEFT=1``). Raises ``RuntimeError`` when the real peft is already imported: objects
    of both would then meet in one process.
    """
    if serving_as_peft():
        return
    real = sys.modules.get("peft")
    if real is not None:
        raise RuntimeError(
            "peftkit.serve_as_peft(): the real `peft` package is already imported in this process "
            f"({getattr(real, '__file__', real)!r}); call serve_as_peft() (or set {ENV_VAR}=1) before anything "
            "imports peft, e.g. at the top of the script"
        )
    late = [m for m in TOOL_MODULES if m in sys.modules]
    if late:
        warnings.warn(
            f"peftkit serves `peft` from now on, but {', '.join(late)} was imported before and keeps what it saw "
            "then; import peftkit before transformers' Trainer, trl and diffusers",
            stacklevel=2,
        )
    sys.meta_path.insert(0, PeftFinder())
    importlib.invalidate_caches()


def _activate_on_import() -> None:
    """``import peftkit``: serve ``peft`` when the real one is absent (or the environment asks for it)."""
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return
    if choice in ("1", "true", "yes", "on"):
        serve_as_peft()
        return
    if choice:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 (serve peft) or 0 (never), or unset")
    if "peft" not in sys.modules and importlib.util.find_spec("peft") is None:
        serve_as_peft()
