"""LoRA on a layer tied to the input embedding (``LoraConfig.ensure_weight_tying`` with the embedding targeted).

The LM head of a tied model computes ``x W^T`` with the embedding's ``W`` (V, d). The embedding's LoRA adds
``s (B_e A_e)^T`` to ``W`` (``A_e`` (r, V), ``B_e`` (d, r): ``lora_embedding_A`` / ``_B``), so the head's update
must be the same matrix: ``A_h = B_e^T`` (r, d), ``B_h = A_e^T`` (V, r), and ``s B_h A_h = s (B_e A_e)^T``.
``TiedLoraAdapter`` holds no factors: ``lora_A`` / ``lora_B`` read the embedding adapter's (transposed views,
built on each access, so autograd, optimizers and loads act on the embedding's two parameters alone), and it
takes the embedding's scaling. One tensor per factor: an optimizer keeps one state for it, the trainable count
counts it once, and the factors stay tied through any training.

peft makes *new* ``nn.Parameter`` objects over the same storage for the head (``lora_A = Parameter(B_e.t())``):
the values stay tied, but its trainable count counts every factor twice (384 where peftkit counts 224 on a
one-layer Llama with V = 64, d = 16, r = 2 and ``q_proj`` targeted too), and ``torch.optim.AdamW`` keeps two
states for one storage (both step it). peftkit's count is the number of trained values.

Merging: the head's update is the embedding's, in the same shared weight, so the head merges nothing
(``merged_params = ()``) and the embedding's merge adds the delta once; unmerge is the embedding's, bit-exact.
peft merges both layers and so adds the delta twice (its merged outputs differ from its unmerged ones).

File keys (peft's): the embedding's ``lora_embedding_A`` / ``_B`` and the head's ``lora_A.weight`` /
``lora_B.weight``, the transposed copies. On load the head's keys are checked for shape and then dropped: the
embedding's keys carry the values (peft writes them equal, being one storage).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...file_options import PREFIX
from ...layers import adapter_layers
from . import dispatch, tying
from .layer import LoraAdapter

_OTHER = {"lora_A": "lora_B", "lora_B": "lora_A"}


class TiedLoraAdapter(LoraAdapter):
    """LoRA whose factors are the input embedding adapter's (see the module doc); linked by ``after_inject``."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init=False)  # own factors: replaced by the embedding's when linked
        self._tie: list[LoraAdapter] = []  # a list: the source is no submodule (no second copy, no double count)
        self.merged_params = ()  # the embedding's merge changes the shared weight once

    @property
    def tied(self) -> bool:
        return bool(self.__dict__.get("_tie"))

    def tie_to(self, source: LoraAdapter) -> None:
        """Read ``source``'s factors and scaling from now on; the own factors go."""
        self._tie = [source]
        for name in _OTHER:
            self._parameters.pop(name, None)
        self.r, self.lora_alpha = source.r, source.lora_alpha
        self.scaling, self.unit_scaling = source.scaling, source.unit_scaling

    def __getattr__(self, name: str) -> Any:
        if name in _OTHER and self.tied:
            source = self.__dict__["_tie"][0]
            if source.kind == self.kind:  # an embedding alias: the same factors
                return getattr(source, name)
            return getattr(source, _OTHER[name]).t()
        return super().__getattr__(name)

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        """peft's keys for the head; on load the factors' keys go to scratch tensors (the embedding's carry the
        values)."""
        out = {}
        for name, suffix in self.checkpoint_keys.items():
            value = getattr(self, name)
            if name in _OTHER and not for_save:
                value = torch.empty(value.shape, dtype=value.dtype, device="cpu" if value.is_meta else value.device)
            out[f"{PREFIX}{self.key}.{suffix}"] = value
        return out


def after_inject(model: nn.Module, adapter_name: str) -> None:
    """Link the new adapter's tied layers to the input embedding's adapter (``tying.with_tied`` made sure it is
    there, a plain LoRA)."""
    layers = adapter_layers(model)
    pending = [layer.adapters[adapter_name] for _, layer in layers if adapter_name in layer.adapters]
    pending = [a for a in pending if isinstance(a, TiedLoraAdapter) and not a.tied]
    if not pending:
        return
    source = dict(layers)[tying.input_embedding_path(model)].adapters[adapter_name]
    for adapter in pending:
        adapter.tie_to(source)


tying.ADAPTER.append(TiedLoraAdapter)
dispatch.AFTER_INJECT.append(after_inject)
