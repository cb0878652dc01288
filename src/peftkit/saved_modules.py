"""Modules trained in full next to the adapters (``modules_to_save``, peft's ``ModulesToSaveWrapper``)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .config import TaskType

# heads that a task trains in full by default (Hugging Face PEFT's choice)
TASK_HEADS = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
}


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: the original stays frozen, each adapter gets its own trainable copy."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    @property
    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current(*args, **kwargs)

    # peft's names, called by transformers' and diffusers' adapter methods on every such wrapper
    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current, name)
