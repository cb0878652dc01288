"""X-LoRA's experts: LoRA adapter folders (written by peft or peftkit), read and checked before the model changes.

``read_experts`` is called once per injection (``XLoraAdapter.select_targets``): every folder is read, its config
must be a plain LoRA one, its targets are found with LoRA's own targeting, and its file must hold exactly the
``lora_A`` / ``lora_B`` tensors of those targets. Any failure raises naming the expert, the folder and what was
expected, before a single module is wrapped.

Targets: Linear, GPT-2 Conv1D and ``nn.Embedding`` (file keys ``lora_embedding_A`` / ``lora_embedding_B``, as
LoRA writes them). Convolutions are refused: peft 0.21.2's ``XLoraConv2dLayer`` multiplies the ``(b, C, H, W)``
input by the ``(b, s, 1)`` token scalings, which broadcasts only when the sizes happen to line up and means
nothing for a feature map, so there is no well-defined peft behaviour to match.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from ...checkpoint import read_adapter
from ...config import CONFIG_NAME
from ...file_options import PREFIX
from ...kernel_helpers import CONV1D_TYPES
from ...targeting import NotApplicableError
from ..lora.config import LoraConfig
from ..lora.layer import LoraAdapter

SUPPORTED = (nn.Linear, nn.Embedding, *CONV1D_TYPES)
_SUFFIX = {False: ("lora_A.weight", "lora_B.weight"), True: ("lora_embedding_A", "lora_embedding_B")}
# LoRA options an expert may not use: X-LoRA mixes plain low-rank deltas (peft refuses DoRA experts as well)
_PLAIN = {"use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
          "trainable_token_indices": None, "target_parameters": None, "layer_replication": None,
          "alora_invocation_tokens": None}


@dataclasses.dataclass
class Expert:
    name: str  # the key in XLoraConfig.adapters
    index: int  # its position in the head's output
    folder: str
    config: LoraConfig
    paths: list[str]  # the modules it adapts
    tensors: dict[str, Tensor]  # file key -> tensor, taken by the layers as they are built


def read_experts(model: nn.Module, named: list[tuple[str, nn.Module]], adapters: dict[str, str]) -> list[Expert]:
    if not adapters:
        raise NotApplicableError("XLoraConfig.adapters is empty: X-LoRA mixes LoRA experts loaded from adapter "
                                 "folders (adapters={'name': folder}); it cannot be built from a bare config")
    modules = dict(named)
    experts = []
    for index, (name, folder) in enumerate(adapters.items()):
        where = f"XLoraConfig.adapters[{name!r}] ({folder})"
        folder = os.fspath(folder)
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise ValueError(f"{where}: not a LoRA adapter folder: no {CONFIG_NAME} there; expected a folder saved "
                             "by PeftModel.save_pretrained with peft_type 'LORA'")
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as fh:
            try:
                peft_type = json.load(fh).get("peft_type")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{where}: {CONFIG_NAME} is not a JSON object; expected a LoRA adapter config") from None
        if peft_type != "LORA":
            raise ValueError(f"{where}: the adapter there is peft_type {peft_type!r}; X-LoRA experts must be LoRA "
                             "adapters (peft_type 'LORA')")
        config, state, source = read_adapter(folder)
        for field, plain in _PLAIN.items():
            if getattr(config, field, plain) not in (plain, [], {}) and getattr(config, field) != plain:
                raise ValueError(f"{where}: LoraConfig.{field}={getattr(config, field)!r}; X-LoRA experts must be "
                                 f"plain LoRA ({field}={plain!r})")
        paths = LoraAdapter.select_targets(model, named, config)
        bad = [(p, type(modules[p]).__name__) for p in paths if not isinstance(modules[p], SUPPORTED)]
        if bad:
            why = (" (per-token scalings have no meaning on a convolution's feature map: peft's XLoraConv2dLayer "
                   "broadcasts them against (batch, channels, height, width) only when the sizes happen to fit)"
                   if isinstance(modules[bad[0][0]], nn.modules.conv._ConvNd) else "")
            raise ValueError(f"{where}: module {bad[0][0]!r} is a {bad[0][1]}; X-LoRA mixes experts on Linear, "
                             f"GPT-2 Conv1D and Embedding layers only{why} "
                             f"(LoraConfig.target_modules={config.target_modules!r})")
        expected = {f"{PREFIX}{p}.{s}" for p in paths for s in _SUFFIX[isinstance(modules[p], nn.Embedding)]}
        state = _without_saved_embeddings(model, named, state, where)
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
            raise ValueError(f"{where}: {source} does not fit this model as a LoRA adapter of its targets: {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected keys)")
        experts.append(Expert(name, index, folder, config, paths, dict(state)))
    return experts


def _without_saved_embeddings(model: nn.Module, named: list[tuple[str, nn.Module]], state: dict[str, Tensor],
                              where: str) -> dict[str, Tensor]:
    """``state`` less the base's input embedding / output layer that LoRA's ``save_embedding_layers`` writes beside
    an adapter on ``embed_tokens`` (``<path>.weight`` or ``<path>.base_layer.weight``). They must equal the model's
    own: X-LoRA leaves the base weights alone (peft's loader would overwrite them with the expert's copy)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layers.append(getattr(model, getter)())
        except (AttributeError, NotImplementedError, TypeError):
            continue
    base = {}
    for path, module in named:
        if any(module is layer for layer in layers if isinstance(layer, nn.Module)):
            for name, p in module.named_parameters(recurse=False):
                base[f"{PREFIX}{path}.{name}"] = base[f"{PREFIX}{path}.base_layer.{name}"] = p
    out = {}
    for key, value in state.items():
        if key not in base:
            out[key] = value
        elif value.shape != base[key].shape or not torch.equal(value.to(base[key]), base[key]):
            raise ValueError(f"{where}: {key!r} (the base embedding saved with the expert) differs from this model's; "
                             "X-LoRA does not overwrite base weights: resize / load the base model to match first")
    return out


def expert_tensors(expert: Expert, path: str, lora: Any) -> dict[str, Tensor]:
    """The file tensors of ``expert`` on ``path``, shape-checked against ``lora`` (a freshly built LoraAdapter)."""
    out = {}
    for param in ("lora_A", "lora_B"):
        key = f"{PREFIX}{path}.{lora.checkpoint_keys[param]}"
        value, want = expert.tensors[key], tuple(getattr(lora, param).shape)
        if tuple(value.shape) != want:
            raise ValueError(f"XLoraConfig.adapters[{expert.name!r}] ({expert.folder}): {key} has shape "
                             f"{tuple(value.shape)}, the module needs {want}")
        out[param] = value
    return out
