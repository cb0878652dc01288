"""``LoraConfig.ensure_weight_tying``: the config side (peft 0.21.2's ``BaseTuner._check_tied_modules``).

A model with ``tie_word_embeddings`` computes its LM head with the input embedding's weight (one tensor). An
adapter on one of them changes both, unless the adapters are tied too. With ``ensure_weight_tying=True`` and
an embedding layer (``embed_tokens`` / ``lm_head``) in the config, peft rewrites the config before targeting,
and so does ``prepare_config`` here, to the letter (the rewritten config is what gets saved):

- an embedding layer in ``modules_to_save``: the input embedding's path is appended to ``modules_to_save``, the
  tied layers' names removed from it, and ``config.modules_to_tie`` (an attribute, not a field: never saved)
  names the tied layers. The engine then saves those layers with a copy that *is* the input embedding's copy
  (``saved_modules.select_tied``);
- else an embedding layer in ``target_modules``: the input embedding's path is added to ``target_modules`` (a
  regex becomes ``(?:<regex>|^<path>$)``), the tied layers' names removed, and ``config.target_modules_to_tie``
  names the tied layers; they get a LoRA that reads the embedding's factors (``tied.py``).

peft's warnings, with its texts: ``ensure_weight_tying`` on a model without tied layers, or with no embedding
layer in the config; and a tied layer in the adapter without ``ensure_weight_tying``.

The tied layers are found by identity: with ``tie_word_embeddings`` set, the ``nn.Linear`` / ``nn.Embedding``
layers whose weight is the input embedding's (peft reads transformers' ``_tied_weights_keys``; on transformers'
models both give the LM head). This module only reads configs and models; ``tied.py`` holds the adapter.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from torch import nn

from ...layers import AdapterLayer
from ...saved_modules import ModulesToSaveWrapper
from ..trainable_tokens.layer import input_embedding_path
from . import dispatch

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's
FIELD = "LoraConfig.ensure_weight_tying"
ADAPTER: list[type] = []  # the tied layers' adapter class (tied.py's TiedLoraAdapter, which imports layer.py)
_WRAPPER_PARTS = {"base_layer", "adapters", "original_module", "modules_to_save"}


def _base(module: nn.Module) -> nn.Module:
    if isinstance(module, AdapterLayer):
        return module.base_layer
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def tied_layers(model: nn.Module) -> tuple[str | None, list[str]]:
    """(path of the input embedding, paths of the other layers sharing its weight); no tied layers unless the
    model's config says ``tie_word_embeddings`` (as peft)."""
    emb = input_embedding_path(model)
    if emb is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return emb, []
    source = _base(model.get_submodule(emb))
    weight = getattr(source, "weight", None)
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or name == emb or _WRAPPER_PARTS & set(name.split(".")):
            continue
        base = _base(module)
        if base is not source and isinstance(base, (nn.Linear, nn.Embedding)) and base.weight is weight:
            out.append(name)
    return emb, out


def _names_embedding(config: Any) -> tuple[bool, bool]:
    """(an embedding layer in ``modules_to_save``, one in ``target_modules``), peft's test."""
    saved = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in (getattr(config, "modules_to_save", None) or ()))
    targets = config.target_modules
    if isinstance(targets, str):
        targeted = any(re.fullmatch(targets, m) for m in EMBEDDING_LAYER_NAMES)
    else:
        targeted = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in (targets or ()))
    return saved, targeted


def _without_tied(names: Any, tied: set[str]) -> Any:
    """peft: for each tied layer, the first name that selects it is removed."""
    for key in tied:
        for m in names:
            if re.match(rf"(^|.*\.){m}($|\..*)", key):
                names.remove(m)
                break
    return names


def prepare_config(model: nn.Module, config: Any) -> None:
    """Rewrite ``config`` for ``ensure_weight_tying`` (see the module doc) and warn as peft does."""
    emb, tied = tied_layers(model)
    saved, targeted = _names_embedding(config)
    if not config.ensure_weight_tying:
        if (saved or targeted) and tied:
            warnings.warn(
                "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                "`ensure_weight_tying` is not set to True. This can lead to complications, for example when merging "
                "the adapter or converting your model to formats other than safetensors. Check the discussion here: "
                "https://github.com/huggingface/peft/issues/2777", stacklevel=5)
        return
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      stacklevel=5)
    elif saved:
        config.modules_to_tie = set(tied)
        names = list(config.modules_to_save or [])
        if emb not in names:
            names.append(emb)
        config.modules_to_save = _without_tied(names, set(tied))
    elif targeted:
        config.target_modules_to_tie = set(tied)
        targets = config.target_modules
        if isinstance(targets, str):
            config.target_modules = rf"(?:{targets}|^{re.escape(emb)}$)"
        else:
            config.target_modules = _without_tied(set(targets) | {emb}, set(tied))
    else:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`", stacklevel=5)


def is_tied(config: Any, key: str) -> bool:
    """Whether the layer at ``key`` is one of ``config.target_modules_to_tie`` (peft's ``_check_tied_module_exists``)."""
    tie = getattr(config, "target_modules_to_tie", None) or ()
    return key in tie or any(key.endswith("." + t) for t in tie)


def adapter_cls(config: Any, key: str = "", *args: Any, **kwargs: Any) -> type | None:
    """The adapter class of the layer at ``key`` (``LoraAdapter(base, config, key, ...)``'s arguments after
    ``config``) when it is tied (``TiedLoraAdapter``), else None."""
    return ADAPTER[0] if is_tied(config, kwargs.get("key", key)) else None


def with_tied(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any, paths: list[str]) -> list[str]:
    """``paths`` plus the tied layers (adapted whatever ``exclude_modules`` says, as peft), checked before the
    model changes: the input embedding must be adapted (its factors are the tied layers'), with plain LoRA."""
    if not getattr(config, "target_modules_to_tie", None):
        return paths
    tied = [name for name, _ in named if name and is_tied(config, name)]
    if not tied:
        return paths
    emb = input_embedding_path(model)
    if emb not in paths:
        raise ValueError(f"{FIELD}: the input embedding {emb!r} is not adapted (exclude_modules, layers_to_transform "
                         f"or the targets keep it out), so the layers tied to it ({tied}) have no adapter to share; "
                         "adapt the input embedding or set ensure_weight_tying=False")
    variant = dispatch.adapter_cls_for(dict(named)[emb], config)
    if variant is not None:
        raise ValueError(f"{FIELD}: the input embedding {emb!r} would get a {variant.__name__}; tied layers share "
                         "plain LoRA factors only: drop the variant's option or set ensure_weight_tying=False")
    if config.use_dora:
        raise ValueError(f"{FIELD}: use_dora=True is not supported on tied layers ({tied}): each would need a "
                         "magnitude of its own for one shared weight; set use_dora=False or ensure_weight_tying=False")
    return [p for p in paths if p not in tied] + tied
