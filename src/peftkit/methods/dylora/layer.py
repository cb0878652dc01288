"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation", arXiv 2210.07558) on Linear and GPT-2 Conv1D layers.

LoRA trained for every rank at once: each training step draws ``b`` uniformly from ``[r_min, r]`` and every layer
of the adapter computes with the rank-b truncation of its factors and the scale of that rank (eq. 3-4),

    h = W0 x + (alpha / b) B[:, :b] A[:b] x,      A (r, d_in), B (d_out, r)

so that any rank ``k <= r`` is a trained LoRA at inference, with no search over ranks and no retraining:
``set_rank(model, k)`` (also ``model.set_rank(k)``) fixes the rank used outside training. ``frozen`` is the
paper's update of the unique part only (row b of A, column b of B).

The draw: a forward pre-hook on the model (``install_model_hooks``) draws one ``b`` per adapter for each forward
call in training mode, from torch's generator, and hands it to the adapter's layers (one rank for the whole model
in a step, as the paper; a recomputed checkpointed segment sees the same one). Outside training (``model.eval()``)
the layers use the inference rank, ``DyLoraConfig.inference_rank`` (None: r).

Files: LoRA's keys (``lora_A.weight`` (r, d_in), ``lora_B.weight`` (d_out, r)), the factors whole; the config
(``peft_type`` ``DYLORA``) holds ``r``, ``r_min`` and ``inference_rank``, which ``set_rank`` updates, so a saved
adapter loads at the rank it was saved with and ``set_rank`` works after loading. At rank r the file is a plain
LoRA file (Hugging Face PEFT loads it with ``LoraConfig(r=r, lora_alpha=alpha, ...)``); at rank k < r, PEFT needs
the first k rows / columns. Merge: ``W0 + (alpha / k) B[:, :k] A[:k]`` at the inference rank (``set_rank`` refuses
a merged layer: unmerge first).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter, AdapterLayer
from ...registry import register_method
from ..lorafa.functional import init_factors
from ..lorafa.layer import LINEAR_LAYERS, check_base
from . import functional as DF
from .config import DyLoraConfig

_HOOK = "_peftkit_dylora_hook"


@register_method(
    "dylora",
    config=DyLoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) per target (any rank k <= r at inference)",
    position="weight delta beside each targeted layer, truncated to a sampled rank per training step",
    paper="arXiv 2210.07558 (DyLoRA)",
    examples={"dylora": {"r": 4, "r_min": 2, "lora_alpha": 8}},
)
class DyLoraAdapter(Adapter):
    supported_layers = LINEAR_LAYERS
    default_roles = ("query", "value")
    checkpoint_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base: nn.Module, config: DyLoraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        check_base(base, key, "DyLoRA")
        self.r, self.r_min, self.lora_alpha, self.frozen = config.r, config.r_min, config.lora_alpha, config.frozen
        self.rank = config.rank  # outside training
        self.train_rank = config.r  # the rank of the current training step (the model hook draws it)
        self._config = config  # set_rank records the inference rank in it (saved with the adapter)
        self.transposed = is_transposed(base)
        d_out, d_in = layer_dims(base)
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base)}
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, config.r, **factory))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        if init:
            init_factors(self.lora_A, self.lora_B, config.init_lora_weights)

    @classmethod
    def param_count(cls, base: nn.Module, config: DyLoraConfig, key: str = "") -> int:
        """Closed form: A and B at the largest rank, r (d_in + d_out) per target."""
        d_out, d_in = layer_dims(base)
        return config.r * (d_in + d_out)

    @property
    def active_rank(self) -> int:
        """The rank this layer computes with now: the step's draw in training, the inference rank otherwise."""
        return self.train_rank if self.training else self.rank

    @property
    def scaling(self) -> float:
        """``alpha / b`` of the active rank."""
        return DF.scaling(self.lora_alpha, self.active_rank)

    # -- weights ---------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        """``(alpha / k) B[:, :k] A[:k]`` at the inference rank k, in the base weight's layout."""
        delta = DF.delta(self.lora_A, self.lora_B, self.rank, self.lora_alpha)
        return delta.t() if self.transposed else delta

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        args = (self.lora_A, self.lora_B, self.active_rank, self.lora_alpha, self.frozen and self.training)
        if out.dtype == self.lora_A.dtype:
            return DF.accumulate(out, x, *args)
        return out + DF.output(x, *args).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, r_min={self.r_min}, inference rank={self.rank}, frozen={self.frozen}"

    # -- the rank draw: a pre-hook on the model ------------------------------------------------------------
    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        if getattr(model, _HOOK, None) is not None:
            return
        bound = functools.partial(set_rank, model)
        setattr(model, _HOOK, (model.register_forward_pre_hook(_draw_ranks), bound))
        if not hasattr(model, "set_rank"):  # model.set_rank(k) (PeftModel reaches it through attribute forwarding)
            model.set_rank = bound

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        installed = getattr(model, _HOOK, None)
        if installed is None:
            return
        handle, bound = installed
        handle.remove()
        if vars(model).get("set_rank") is bound:
            del model.set_rank
        delattr(model, _HOOK)


def _dylora_adapters(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, str, DyLoraAdapter]]:
    """(layer path, adapter name, adapter) of every DyLoRA adapter in ``model`` (only ``adapter_name``'s if given)."""
    return [(path, name, a) for path, layer in model.named_modules() if isinstance(layer, AdapterLayer)
            for name, a in layer.adapters.items()
            if isinstance(a, DyLoraAdapter) and adapter_name in (None, name)]


def _draw_ranks(model: nn.Module, args: Any) -> None:
    """One rank per DyLoRA adapter for this training call, shared by its layers."""
    if not model.training:
        return
    drawn: dict[str, int] = {}
    for _, name, adapter in _dylora_adapters(model):
        if adapter.training:
            if name not in drawn:
                drawn[name] = DF.sample_rank(adapter.r_min, adapter.r)
            adapter.train_rank = drawn[name]


def set_rank(model: nn.Module, rank: int, adapter_name: str | None = None) -> None:
    """Use rank ``rank`` (1 <= rank <= r) outside training for every DyLoRA adapter of ``model`` (a ``PeftModel``,
    its ``base_model`` or the adapted model), or only ``adapter_name``: the layers compute with
    ``(alpha / rank) B[:, :rank] A[:rank]``, and the adapter's config records it (``inference_rank``), so a save
    keeps it. Checks every layer before changing any; a merged layer is refused (unmerge first)."""
    found = _dylora_adapters(model, adapter_name)
    if not found:
        raise ValueError(f"set_rank: no DyLoRA adapter{f' named {adapter_name!r}' if adapter_name else ''} in "
                         f"{type(model).__name__}")
    for path, name, adapter in found:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= adapter.r:
            raise ValueError(f"set_rank: rank must be an integer in [1, r={adapter.r}] for adapter {name!r}, got "
                             f"{rank!r}")
    layers = {path: layer for path, layer in model.named_modules() if isinstance(layer, AdapterLayer)}
    merged = [f"{path} ({name})" for path, name, _ in found if name in layers[path].merged_adapters]
    if merged:
        raise ValueError(f"set_rank: {merged[0]} is merged at rank {found[0][2].rank}; unmerge before changing the "
                         "rank")
    for _, _, adapter in found:
        adapter.rank = rank
        adapter._config.inference_rank = rank
