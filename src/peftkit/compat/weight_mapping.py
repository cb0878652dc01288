"""transformers' ``model.load_adapter(folder)``: file keys renamed to peftkit's parameter names.

transformers (5.x) loads an adapter in three calls into peft: ``build_peft_weight_mapping`` (the key
renames its loader applies to the file), ``inject_adapter_in_model`` (the new adapter's parameters), then
its own loader, which expects every parameter whose path holds the adapter name. peft's renames are
patterns over peft's layer layout (``q_proj.lora_A.weight`` -> ``q_proj.lora_A.default.weight``); peftkit's
parameters sit elsewhere (``q_proj.adapters.default.lora_A``) and which file key feeds which parameter is
known only once the adapter exists. So :func:`build_peft_weight_mapping` returns a list that
:func:`inject_adapter_in_model` fills, for the same config object, with one exact rename per file key.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from torch import nn

from peftkit import checkpoint as ckpt
from peftkit.functional import inject_adapter_in_model as _inject
from peftkit.tuner import TunerModel

# per thread, the last list handed to transformers: (config object, adapter name, renames), until the
# injection for that config fills it (transformers makes the two calls back to back)
_PENDING = threading.local()


def build_peft_weight_mapping(weight_conversions: Any, adapter_name: str, peft_config: Any = None) -> list[Any]:
    """The list of renames transformers applies to the adapter file; filled by the injection that follows."""
    renames: list[Any] = []
    _PENDING.entry = (peft_config, adapter_name, renames) if peft_config is not None else None
    return renames


def inject_adapter_in_model(peft_config: Any, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Any = None) -> nn.Module:
    """peftkit's ``inject_adapter_in_model``; completes a pending :func:`build_peft_weight_mapping` list."""
    _inject(peft_config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
    pending = getattr(_PENDING, "entry", None)
    if pending is not None and pending[0] is peft_config and pending[1] == adapter_name:
        _PENDING.entry = None
        pending[2].extend(_renames(model, adapter_name))
    return model


def _renames(model: nn.Module, adapter_name: str) -> list[Any]:
    from transformers.core_model_loading import WeightRenaming

    names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    out = []
    for key, tensor in ckpt.adapter_tensors(TunerModel.over(model), adapter_name).items():
        target = names.get(id(tensor))
        if target is not None:
            out.append(WeightRenaming(source_patterns=f"^{re.escape(key)}$", target_patterns=target))
    return out
