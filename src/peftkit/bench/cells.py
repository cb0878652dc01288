"""Cells that need more than a config: what the method reads besides it, made the same for both libraries.

- X-LoRA mixes LoRA experts read from adapter folders: two seeded LoRA experts (rank 4 and 2 on the
  attention projections, non-zero B) are written by peftkit (peft's file layout) into a temporary folder
  that lives as long as the cell; the config names them and the base width as ``hidden_size``, and the base
  model runs with ``use_cache`` off (peft refuses X-LoRA otherwise).
- CPT's loss reads which tokens are template, input and output: the batches carry an ``input_type_mask``
  (per row a quarter of each: 1 input template, 2 input, 3 output template, 4 output, the trained labels).
  peft shifts the caller's mask in place, so each training step passes a copy (``measure.train_step``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..methods.lora import LoraConfig
from ..model import get_peft_model
from .grid import BenchModel, MethodChoice

EXPERTS = ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]})


def _no_cache(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def built() -> nn.Module:
        model = build()
        model.config.use_cache = False
        return model
    return built


def write_experts(model: BenchModel, folder: str) -> dict[str, str]:
    """Seeded LoRA experts of ``model`` saved under ``folder``: {name: path}."""
    out = {}
    for i, kwargs in enumerate(EXPERTS):
        expert = get_peft_model(model.build(seed=0), LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():  # seeded, non-zero updates (init_lora_weights=False draws B too)
            torch.manual_seed(100 + i)
            for p in expert.parameters():
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn_like(p))
        path = os.path.join(folder, f"expert{i}")
        expert.save_pretrained(path)
        out[str(i)] = path  # peft loads the experts as "0", "1" ... and looks them up by these keys
    return out


def cpt_type_mask(ids: torch.Tensor) -> torch.Tensor:
    """Types 1-4 (input template, input, output template, output), a quarter of each row each."""
    seq = ids.shape[1]
    types = 1 + (torch.arange(seq) * 4) // max(seq, 1)
    return types.clamp(max=4).expand_as(ids).clone()


@contextlib.contextmanager
def prepared(choice: MethodChoice, model: BenchModel, config: dict[str, Any]) -> Iterator[tuple[BenchModel, dict]]:
    """The bench model and config a cell runs (the given ones for most methods)."""
    name = choice.spec.name
    if name == "xlora" and not config.get("adapters"):
        base = dataclasses.replace(model, build_fn=_no_cache(model.build_fn))
        with tempfile.TemporaryDirectory(prefix="peftkit-bench-xlora-") as tmp:
            hidden = int(base.build().config.hidden_size)
            yield base, {**config, "adapters": write_experts(base, tmp), "hidden_size": hidden}
        return
    if name == "cpt":
        yield dataclasses.replace(model, extra_inputs=lambda ids: {"input_type_mask": cpt_type_mask(ids)}), config
        return
    yield model, config
