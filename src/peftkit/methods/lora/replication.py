"""LoRA's ``layer_replication`` (peft's ``replicate_layers``, as in LLaMA Pro / SOLAR-style depth up-scaling):
the model's transformer layers are rebuilt from ranges of the original ones, ``[[0, 4], [2, 5]]`` giving layers
``0 1 2 3 2 3 4``. A repeated layer shares every base parameter with its original (no copy of the weights) and
gets its own LoRA, so the stack grows in depth for the cost of the adapters only.

As peft: the layer list is found at ``model(.model)*.layers`` (Llama-like), ``.bert.encoder.layer`` /
``.encoder.layer`` (BERT) or ``.h`` (Falcon, GPT-2); ``layer_idx`` attributes are renumbered (transformers' KV
cache) and ``config.num_hidden_layers`` updated; the change stays in the model (loading the adapter
replicates again, from the config); adapters on shared weights cannot be merged (a merge into one copy
would change the others).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ...config import ConfigError


def check_layer_map(layer_map: Any) -> None:
    """``layer_replication`` is a list of ``[start, end)`` pairs of layer indices, ``0 <= start < end``."""
    ok = isinstance(layer_map, (list, tuple)) and len(layer_map) > 0 and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                    for i in pair)
        and 0 <= pair[0] < pair[1] for pair in layer_map)
    if not ok:
        raise ConfigError(f"LoraConfig.layer_replication: expected a non-empty list of [start, end) layer ranges "
                          f"with 0 <= start < end, got {layer_map!r}")


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the layer list, its attribute path)."""
    while hasattr(model, "model") and isinstance(model.model, nn.Module):
        model = model.model
    if isinstance(getattr(model, "bert", None), nn.Module):
        model = model.bert
    for owner, path in ((model, "layers"), (getattr(model, "encoder", None), "layer"), (model, "h")):
        if owner is not None and isinstance(getattr(owner, path, None), nn.ModuleList):
            return owner, path
    raise ValueError("LoraConfig.layer_replication: no layer list found (expected model(.model)*.layers as in "
                     "Llama, .encoder.layer as in BERT, or .h as in Falcon / GPT-2)")


def shared_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are the original's (buffers and the rest copied)."""
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name)
        for pname, param in sub.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def replicate_layers(model: nn.Module, layer_map: list) -> None:
    """Rebuild ``model``'s layer list from ``layer_map`` (checked in full before anything changes)."""
    check_layer_map(layer_map)
    owner, attr = _layer_list(model)
    layers = getattr(owner, attr)
    if max(end for _, end in layer_map) > len(layers):
        raise ConfigError(f"LoraConfig.layer_replication: {layer_map!r} reaches past the model's {len(layers)} "
                          "layers (ranges are [start, end) of the original layer indices)")
    new = []
    for start, end in layer_map:
        for i in range(start, end):
            new.append(shared_clone(layers[i]))
            for sub in new[-1].modules():
                if hasattr(sub, "layer_idx"):  # transformers' attention reads its cache slot from it
                    sub.layer_idx = len(new) - 1
    setattr(owner, attr, nn.ModuleList(new))
    config = getattr(owner, "config", None)
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new)
