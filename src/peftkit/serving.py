"""Whether peftkit serves the import name ``peft`` in this process, and the warning for tools that bound the real
one (see ``peftkit.compat``). No peftkit imports: the model module reads it when a PeftModel is built."""

from __future__ import annotations

import sys
import warnings

ENV_VAR = "PEFTKIT_SERVE_AS_PEFT"

# tool modules that bind ``peft`` names (or decide peft is absent) when they are imported
TOOL_MODULES = ("transformers.trainer", "transformers.trainer_utils", "trl", "diffusers.loaders.peft",
                "accelerate.utils.modeling")

_warned = False


def serving_as_peft() -> bool:
    """Whether ``import peft`` gives peftkit in this process (its finder is on ``sys.meta_path``)."""
    return any(getattr(f, "serves_peft", False) for f in sys.meta_path)


def warn_if_tools_see_real_peft() -> None:
    """Warn (once) when a tool that drives PEFT models is loaded against the real peft, not peftkit: it
    would not recognise a peftkit model (whole-model checkpoints, labels not shifted for label smoothing)."""
    global _warned
    if _warned or serving_as_peft() or "peft" not in sys.modules:
        return
    tools = [m for m in TOOL_MODULES if m in sys.modules]
    if tools:
        _warned = True
        warnings.warn(
            f"{', '.join(tools)} loaded the real `peft` package, so they will not recognise peftkit models "
            "(a Trainer would save the whole model and not shift labels for label smoothing). Set "
            f"{ENV_VAR}=1, or call peftkit.serve_as_peft() before importing them, or uninstall peft",
            stacklevel=3,
        )
