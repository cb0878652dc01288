"""Activated LoRA (aLoRA; Greenewald et al. 2025, arXiv 2504.12397): ``LoraConfig(alora_invocation_tokens=[...])``.

The adapter acts only from its invocation sequence on: in each row, from the start of the *last* occurrence of
``alora_invocation_tokens`` to the end of the row; rows without the sequence run the base model alone. A model can
then reuse the base model's KV cache of everything before the invocation. As peft (``ALoraLinearVariant``,
``calculate_alora_offsets``), row i's *offset* is the number of tokens adapted counted from the end of its
sequence (None: none); a layer whose input has T positions adapts the last ``min(offset, T)`` of them. So
``generate`` computes the offsets once, from the prompt: the prompt's forward adapts from the invocation on, and
every generated token (T = 1) is adapted in the rows whose prompt had the invocation, none in the others.

The offsets are per call: ``call_context`` (``Adapter.call_context``, through ``LoraAdapter`` and
``dispatch.CALL_HOOKS``) computes them around a ``PeftModelForCausalLM`` forward / ``generate`` (or takes an
explicit ``alora_offsets=`` argument, on any ``PeftModel``) and keeps them in a thread-local for the call, never on
the layers, which request threads share (the rule of ``routing.py``). Mixed batches (``adapter_names``) find each
row's own adapter's invocation sequence. Merging is refused (no merged weight adapts part of a sequence), before
anything changes. aLoRA adapts Linear (and GPT-2 Conv1D) layers, as peft; DoRA and ``target_parameters`` are
refused by ``LoraConfig``, embeddings, convolutions and attention modules when the adapter is built.
Not supported: gradient checkpointing while training (refused; the recomputation in backward runs outside the
call), beam search (refused, as peft).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES
from . import dispatch
from .layer import LoraAdapter

FIELD = "alora_invocation_tokens"
BASE = "__base__"


class _Call:
    """One call's offsets (row -> adapted positions from the end, None: none) and the masks built from them."""

    __slots__ = ("offsets", "masks")

    def __init__(self, offsets: list[int | None]) -> None:
        self.offsets = offsets
        self.masks: dict[tuple, Tensor] = {}  # (rows, T, device, row subset) -> flat indices of adapted positions


class _Local(threading.local):
    call: _Call | None = None  # this thread's innermost aLoRA call


_LOCAL = _Local()


@contextlib.contextmanager
def offsets_scope(offsets: Sequence[Any] | Tensor) -> Iterator[None]:
    """Within the block, and only in this thread, aLoRA layers adapt row i's last ``offsets[i]`` positions."""
    if isinstance(offsets, Tensor):
        offsets = offsets.tolist()
    values: list[int | None] = []
    for o in offsets:
        if o is not None and (isinstance(o, bool) or not isinstance(o, (int, float)) or o < 0):
            raise ValueError(f"alora_offsets: expected one integer >= 0 or None per batch row, got {list(offsets)!r}")
        values.append(None if o is None else int(o))
    outer = _LOCAL.call
    _LOCAL.call = _Call(values)
    try:
        yield
    finally:
        _LOCAL.call = outer


def current_offsets() -> list[int | None] | None:
    """The offsets of the aLoRA call this thread is making, or None outside one."""
    call = _LOCAL.call
    return None if call is None else call.offsets


# -- the offsets ------------------------------------------------------------------------------------------
def last_match_offsets(input_ids: Tensor, tokens: Sequence[int]) -> list[int | None]:
    """Per row: ``len(row) - start`` of the last occurrence of ``tokens`` in the row, None where it does not occur."""
    rows, seq = input_ids.shape
    n = len(tokens)
    if seq < n:
        return [None] * rows
    pattern = torch.tensor(list(tokens), dtype=input_ids.dtype, device=input_ids.device)
    hits = (input_ids.unfold(1, n, 1) == pattern).all(-1)  # (rows, seq - n + 1): a match starts here
    starts = torch.arange(hits.shape[1], device=input_ids.device)
    last = torch.where(hits, starts, torch.full_like(starts, -1)).amax(1)
    return [None if s < 0 else seq - s for s in last.tolist()]


def calculate_offsets(configs: dict[str, Any], active: str | None, input_ids: Tensor,
                      adapter_names: Sequence[str] | None = None) -> list[int | None]:
    """peft's ``calculate_alora_offsets``: row i uses the invocation sequence of its adapter (``adapter_names[i]``,
    else ``active``); rows of "__base__" and of adapters that are not aLoRA get None."""
    rows = input_ids.shape[0]
    offsets: list[int | None] = [None] * rows
    groups: dict[str, list[int]] = {}
    for i in range(rows):
        name = adapter_names[i] if adapter_names and i < len(adapter_names) else active
        if name is None or name == BASE:
            continue
        if name not in configs:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {i}.", stacklevel=3)
            continue
        if getattr(configs[name], FIELD, None) is not None:
            groups.setdefault(name, []).append(i)
    for name, members in groups.items():
        found = last_match_offsets(input_ids[members], configs[name].alora_invocation_tokens)
        for i, offset in zip(members, found):
            offsets[i] = offset
    return offsets


def _finds_invocation(model: Any) -> bool:
    """peft computes offsets in ``PeftModelForCausalLM`` only; other models take ``alora_offsets=``."""
    return any(c.__name__ == "PeftModelForCausalLM" for c in type(model).__mro__)


def _relevant(model: Any, adapter_names: Sequence[str] | None) -> bool:
    """peft's ``is_alora_relevant_in_batch``: the active adapter, or one named in the mixed batch, is an aLoRA."""
    configs = model.peft_config
    active = model.active_adapters
    if active and getattr(configs.get(active[0]), FIELD, None):
        return True
    return any(getattr(configs.get(n), FIELD, None) for n in set(adapter_names or ()) if n != BASE)


def _checkpointing(base: Any) -> bool:
    """Whether a transformers model runs with activation (gradient) checkpointing."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the new name first (v5)
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def call_context(model: Any, call: dict[str, Any]) -> Any:
    """``Adapter.call_context`` for aLoRA: the call's offsets, explicit (``alora_offsets=``, taken out of the
    call's arguments) or found in ``input_ids``, in a thread-local scope; None when the call has none."""
    kwargs = call["kwargs"]
    offsets = kwargs.pop("alora_offsets", None)
    names = call["adapter_names"]
    if offsets is None and _finds_invocation(model) and _relevant(model, names):
        args = call["args"]
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], Tensor):
            input_ids = args[0]
        if input_ids is not None:
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            active = model.active_adapters[0] if model.active_adapters else None
            offsets = calculate_offsets(model.peft_config, active, input_ids, names)
        elif call["generate"]:
            warnings.warn("Cannot calculate aLoRA offsets during generate as input_ids are not available. "
                          "Disabling aLoRA.", stacklevel=4)
        elif kwargs.get("inputs_embeds") is not None:
            warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA "
                          "for this forward pass.", stacklevel=4)
    if offsets is None:
        return None
    num_beams = kwargs.get("num_beams")
    if call["generate"] and isinstance(num_beams, int) and num_beams > 1:
        raise ValueError("Beam search not yet supported for aLoRA.")
    if model.training and torch.is_grad_enabled() and _checkpointing(model.get_base_model()):
        raise NotImplementedError(
            "aLoRA with gradient checkpointing is not supported by peftkit yet: the recomputation in backward runs "
            "outside the call and would not see the invocation offsets; disable gradient checkpointing")
    return offsets_scope(offsets)


# -- the adapter ------------------------------------------------------------------------------------------
class ALoraAdapter(LoraAdapter):
    """LoRA on the positions from each row's invocation sequence on (the offsets of the current call)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        if not isinstance(base, (nn.Linear, *CONV1D_TYPES)):
            raise ValueError(
                f"LoraConfig.alora_invocation_tokens: aLoRA adapts Linear layers only (as peft); {key or 'a target'} "
                f"is a {type(base).__name__}: leave it out of target_modules")
        super().__init__(base, config, key, init=init)

    # -- merging is refused: no merged weight adapts only part of a sequence --------------------------------
    def check_merge(self, base: nn.Module) -> None:
        raise NotImplementedError(
            "aLoRA does not support merging: it adapts only the tokens from the invocation sequence on, which no "
            "merged weight can do (nothing was merged)")

    def delta_weight(self, base: nn.Module) -> Tensor:
        self.check_merge(base)
        return super().delta_weight(base)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        self.check_merge(base)
        return super().merge(base, weight)

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        raise NotImplementedError("aLoRA does not support unmerging.")

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        self.check_merge(base)
        return super().effective_param(base, name, value)

    # -- forward -------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None  # the fast paths adapt every position

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        call = _LOCAL.call
        if call is None and not torch.is_grad_enabled():
            return out  # no offsets: the base alone (peft: an all-false mask)
        return self._adapt(x, out, call, None)

    @classmethod
    def batched_forward(cls, adapters: list["ALoraAdapter"], base: nn.Module, x: Tensor, out: Tensor, index: Tensor,
                        cache: dict) -> Tensor | None:
        """Mixed batch: each aLoRA adapter on its own rows, with those rows' offsets (peft's sub-batches)."""
        call = _LOCAL.call
        if call is None:
            return out
        key = ("rows", id(index), len(adapters))
        rows = call.masks.get(key)
        if rows is None:
            slots = index.tolist()
            rows = [[i for i, s in enumerate(slots) if s == j] for j in range(len(adapters))]
            call.masks[key] = rows  # the index lives as long as the call's route plan
        for adapter, members in zip(adapters, rows):
            if not members:
                continue
            sel = torch.tensor(members, device=out.device)
            sub = adapter._adapt(x.index_select(0, sel), out.index_select(0, sel), call, tuple(members))
            out = out.index_copy(0, sel, sub)
        return out

    def _positions(self, out: Tensor, call: _Call | None, members: tuple[int, ...] | None) -> Tensor:
        """Flat indices of the positions of ``out`` to adapt: row i's last ``min(offset_i, T)`` positions."""
        rows = out.shape[0]
        steps = out.shape[1] if out.dim() == 3 else 1
        key = (rows, steps, out.device, members)
        if call is not None and key in call.masks:
            return call.masks[key]
        offsets = [] if call is None else call.offsets
        if members is not None:
            offsets = [offsets[i] for i in members]
        if call is None:
            offsets = [None] * rows
        elif len(offsets) != rows:
            raise ValueError(f"alora_offsets has {len(offsets)} entries but the batch through this layer has {rows} "
                             "rows; give one offset per row (beam search and num_return_sequences > 1 are not "
                             "supported with aLoRA)")
        counts = torch.tensor([0 if o is None else min(o, steps) for o in offsets], dtype=torch.long,
                              device=out.device)
        mask = torch.arange(steps, device=out.device).unsqueeze(0) >= (steps - counts).unsqueeze(1)  # (rows, T)
        if out.dim() != 3:
            mask = mask.expand(rows, int(out[..., 0].numel() // max(rows, 1)))
        positions = mask.reshape(-1).nonzero().squeeze(1)
        if call is not None:
            call.masks[key] = positions
        return positions

    def _adapt(self, x: Tensor, out: Tensor, call: _Call | None, members: tuple[int, ...] | None) -> Tensor:
        """``out`` plus ``s (B A x + b)`` at the adapted positions only (peft's ``ALoraLinearVariant.forward``)."""
        A = self.lora_A
        positions = self._positions(out, call, members)
        d_out = out.shape[-1]
        x_flat = x.reshape(-1, x.shape[-1])
        if x_flat.dtype != A.dtype:
            x_flat = x_flat.to(A.dtype)
        sel = x_flat.index_select(0, positions)
        if self.dropout is not None:
            sel = self.dropout(sel)
        lora = F.linear(F.linear(sel, A), self.lora_B, self.bias_B) * self.scaling
        out_flat = out.reshape(-1, d_out)
        adapted = (out_flat.index_select(0, positions) + lora).to(out.dtype)
        return out_flat.index_copy(0, positions, adapted).view(out.shape)


dispatch.BY_FIELD[FIELD] = ALoraAdapter
dispatch.CALL_HOOKS.append(call_context)
