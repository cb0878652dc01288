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


# containers have no forward of their own: PEFT refuses to wrap them
_NOT_WRAPPABLE = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def select_saved(model: nn.Module, names: list[str], adapter_name: str, layer_cls: type) -> list[str]:
    """Paths of the modules ``modules_to_save`` (``names``, dotted suffixes) selects, wrapped ones included (the
    new adapter gets its own copy there). Checked before anything changes: a container (``nn.ModuleDict`` ...)
    or a layer that already carries an adapter (``layer_cls``) raises ``TypeError``, as PEFT's check_module."""
    out: list[str] = []
    skip: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if not path or (skip and path.startswith(skip)):
            continue
        hit = any(path == n or path.endswith("." + n) for n in names)
        if isinstance(module, (ModulesToSaveWrapper, layer_cls)):
            skip = skip + (path + ".",)
            if hit and isinstance(module, layer_cls):
                raise TypeError(
                    f"modules_to_save of adapter {adapter_name!r}: {path!r} carries adapter(s) "
                    f"{list(module.adapters)}; a module is either adapted or saved in full, expected a plain module")
        elif hit and isinstance(module, _NOT_WRAPPABLE):
            raise TypeError(f"modules_to_save of adapter {adapter_name!r}: {path!r} is a {type(module).__name__} "
                            "(a container without forward); expected a module that runs, e.g. one of its children")
        if hit:
            out.append(path)
    return out


def select_tied(model: nn.Module, config: Any, adapter_name: str, saved: list[str], layer_cls: type
                ) -> tuple[str, list[str]]:
    """peft's ``modules_to_tie`` (a config attribute a method's ``prepare_config`` sets: LoRA's
    ``ensure_weight_tying``): modules saved in full whose copy shares the input embedding's copy (one tensor, the
    LM head of a tied model). Returns (the input embedding's path, the tied modules' paths), checked before
    anything changes (as ``select_saved``): the input embedding must be in ``saved``."""
    names = sorted(getattr(config, "modules_to_tie", None) or ())
    if not names:
        return "", []
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    path = next((name for name, module in model.named_modules() if emb is not None and module is emb), None)
    if path not in saved:
        raise ValueError(f"modules_to_tie {names} of adapter {adapter_name!r}: the input embedding ({path!r}) is not "
                         "in modules_to_save, so the tied modules have no trained copy to share")
    return path, [p for p in select_saved(model, names, adapter_name, layer_cls) if p not in saved]


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: the original stays frozen, each adapter gets its own trainable copy."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add(self, name: str, tied_to: "ModulesToSaveWrapper | None" = None) -> None:
        """A trainable copy for adapter ``name``; ``tied_to``: a wrapper whose copy for ``name`` lends the new copy
        its weight (peft's ``tied_module``: the LM head of a tied model shares the input embedding's copy)."""
        memo = {} if tied_to is None else {id(self.original_module.weight): tied_to.modules_to_save[name].weight}
        self.modules_to_save[name] = copy.deepcopy(self.original_module, memo)

    def check_single(self, path: str, names: list[str]) -> None:
        """Raise when more than one of ``names`` has a copy here: one module runs one copy (as PEFT)."""
        here = [n for n in names if n in self.modules_to_save]
        if len(here) > 1:
            raise ValueError(f"set_adapter: only one adapter can be set at a time for modules_to_save module "
                             f"{path!r}, got {len(here)} ({here}); activate at most one adapter that saves it")

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
