"""Selective methods: BitFit, LN tuning, last-k layers, FISH mask, diff pruning, Child-Tuning.

They change existing parameters (or some entries of them) instead of adding modules. Each is a small
module on one shared adapter (``adapter.py``): a delta on the selected entries, never written into the
frozen base until merged, saved sparse (``config.py`` describes the file formats).
"""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .adapter import SelectiveAdapter  # noqa: E402
from .config import (  # noqa: E402
    BitFitConfig,
    ChildTuningConfig,
    DiffPruningConfig,
    FishMaskConfig,
    LastKConfig,
    SelectionError,
)
from .diff_pruning import l0_penalty, project_to_sparsity  # noqa: E402
from .fisher import default_loss, fisher_diagonal, fisher_mask  # noqa: E402
from .layernorm import LNTuningConfig  # noqa: E402
from .lastk import block_stacks  # noqa: E402

__all__ = [
    "BitFitConfig", "ChildTuningConfig", "DiffPruningConfig", "FishMaskConfig", "LNTuningConfig", "LastKConfig",
    "SelectionError", "SelectiveAdapter", "block_stacks", "default_loss", "fisher_diagonal", "fisher_mask",
    "l0_penalty", "project_to_sparsity", "selection_summary",
]


def selection_summary(model, adapter_name: str = "default") -> dict[str, int]:
    """Trainable parameters of one adapter, split: ``selected`` (the method's own entries) and
    ``modules_to_save`` (the task head and other modules trained in full)."""
    tuner = model.base_model
    selected = sum(p.numel() for _, a in tuner.adapters(adapter_name) for p in a.parameters())
    saved = sum(p.numel() for _, w in tuner.saved_modules() if adapter_name in w.modules_to_save
                for p in w.modules_to_save[adapter_name].parameters())
    return {"selected": selected, "modules_to_save": saved}
