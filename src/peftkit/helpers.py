"""peft's ``peft.helpers``: small tools around an adapted model.

``update_forward_signature`` / ``update_generate_signature`` have no counterpart: a peftkit PeftModel's
``forward`` already reports the base model's signature (signature.py) and ``generate`` is the base model's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn

from .config import PeftConfig
from .layers import AdapterLayer


def check_if_peft_model(model_name_or_path: str | os.PathLike) -> bool:
    """Whether the local folder holds an adapter config peftkit can read (peftkit never downloads)."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # noqa: BLE001 - any failure means "not an adapter folder", as in peft
        return False
    return True


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float | int) -> Iterator[None]:
    """Within the block, every LoRA-family adapter's scaling is ``multiplier`` times its current value; with
    LoRA and a multiplier in [0, 1] this is WiSE-FT between the base and the fine-tuned model."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    adapters = [a for m in model.modules() if isinstance(m, AdapterLayer)
                for a in m.adapters.values() if hasattr(a, "unit_scaling")]
    if not adapters:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    saved = [a.scaling for a in adapters]
    for a in adapters:
        a.scaling = a.scaling * multiplier
    try:
        yield
    finally:
        for a, value in zip(adapters, saved):
            a.scaling = value


@contextlib.contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """peft's layers cast their input to the adapter weight's dtype, which clashes with diffusers' layerwise
    casting hooks, so peft lets callers switch it off. peftkit's adapters cast only their own branch and return
    the base layer's output dtype: there is nothing to switch off, and the block runs as it is."""
    yield
