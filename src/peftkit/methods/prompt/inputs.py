"""The call's arguments as prompt methods rewrite them: pure functions on a forward's keyword arguments.

Virtual tokens in front of the input embeddings (masks, positions, token types and labels shifted to match),
the KV-cache argument under either of its names, and a mixed batch's per-row prompts.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn

CACHE_KEYS = ("cache", "past_key_values")  # transformers 5.x name first, the deprecated alias second


def bind_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All of a call's arguments by name (positional ones named after ``model.forward``'s parameters)."""
    if not args:
        return dict(kwargs)
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments, expected at most "
                        f"{len(params)}")
    return {**dict(zip(params, args)), **kwargs}


def input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (AttributeError, NotImplementedError):
        return None


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def accepts_cache(model: nn.Module) -> bool:
    """Whether ``model`` takes a KV cache: in its own forward, or through ``**kwargs`` its backbone takes."""
    params = forward_params(model)
    if params & set(CACHE_KEYS):
        return True
    backbone = getattr(model, "base_model", None)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    return (has_var_kw and isinstance(backbone, nn.Module) and backbone is not model
            and bool(forward_params(backbone) & set(CACHE_KEYS)))


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """The call's cache (under either name), removed from ``kwargs``. With ``use_cache=False`` a cache is
    ignored: it can only be one a previous call returned anyway (``generate(use_cache=False)`` feeds back the
    cache some models return), and using it would count the sequence twice."""
    cache = None
    for key in CACHE_KEYS:
        value = kwargs.pop(key, None)
        cache = value if value is not None else cache
    return None if kwargs.get("use_cache") is False else cache


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return cache[0][0].shape[-2] if len(cache) else 0
    return int(cache.get_seq_length())


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0]
    raise ValueError("prompt methods need input_ids or inputs_embeds to know the batch size")


def prepend_ones(mask: Tensor | None, n: int) -> Tensor | None:
    """A 2D attention mask with ``n`` attended positions in front (None stays None)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"prompt methods need a 2D attention mask (batch, length), got shape {tuple(mask.shape)}")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def prepend_positions(position_ids: Tensor | None, n: int) -> Tensor | None:
    """``[0..n-1; position_ids + n]``: the virtual tokens take the first ``n`` positions."""
    if position_ids is None:
        return None
    front = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
    front = front.expand(*position_ids.shape[:-1], n)
    return torch.cat([front, position_ids + n], dim=-1)


def embed_prompts(model: nn.Module, kwargs: dict[str, Any], n: int, prompts: Callable[[], Tensor]) -> dict[str, Any]:
    """Prepend the first ``n`` rows of ``prompts()`` ((>= n, d), or (rows, >= n, d) for one prompt per row; called
    only when the call embeds them, not in a decoding step) to the input embeddings of the call (see the module
    docstring)."""
    cache = pop_cache(kwargs)
    if cache is not None:
        kwargs["cache"] = cache
    if is_encoder_decoder(model):  # the encoder's hook prepends the prompt (embed_encoder_prompts); the
        kwargs["attention_mask"] = prepend_ones(kwargs.get("attention_mask"), n)  # decoder's cross-attention
        return kwargs  # mask covers it
    if cache_length(cache) > 0:  # a decoding step: the cache already holds the virtual tokens
        kwargs["attention_mask"] = prepend_ones(kwargs.get("attention_mask"), n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return kwargs
    length = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
    kwargs["inputs_embeds"] = _cat_prompts(model, kwargs, prompts()[..., :n, :])
    kwargs["attention_mask"] = prepend_ones(kwargs.get("attention_mask"), n)
    kwargs["position_ids"] = prepend_positions(kwargs.get("position_ids"), n)
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], n), tt], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:  # token-level labels
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    return kwargs


def embed_encoder_prompts(model: nn.Module, kwargs: dict[str, Any], prompts: Tensor) -> dict[str, Any]:
    """Prepend ``prompts`` to an encoder call's inputs; its mask is extended unless the model's forward did."""
    n = prompts.shape[-2]
    length = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
    kwargs["inputs_embeds"] = _cat_prompts(model, kwargs, prompts)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[-1] == length:
        kwargs["attention_mask"] = prepend_ones(mask, n)
    return kwargs


def _cat_prompts(model: nn.Module, kwargs: dict[str, Any], prompts: Tensor) -> Tensor:
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = input_embeddings(model)(ids)
    front = prompts.to(embeds.dtype)  # (n, d), or (rows, n, d): one prompt per row (multitask prompt tuning)
    front = front if front.dim() == 3 else front.unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat([front, embeds], dim=1)

def embed_routed_prompts(model: nn.Module, kwargs: dict[str, Any], rows: list[Tensor | None]) -> dict[str, Any]:
    """A mixed batch: row i gets its own prompt (n_i tokens, 0 for a base row), right-aligned in a front of
    N = max n_i positions whose unused places are masked out. Position ids are explicit per row (virtual
    tokens 0..n_i-1, real tokens shifted by n_i), so each row computes what it would alone."""
    embeds = kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else kwargs["input_ids"]
    B, L, device = ref.shape[0], ref.shape[1], ref.device
    if len(rows) != B:
        raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {B} rows")
    counts = torch.tensor([0 if r is None else r.shape[0] for r in rows], device=device)
    N = int(counts.max())
    col = torch.arange(N, device=device).expand(B, N)
    start = (N - counts).unsqueeze(1)
    front_mask = (col >= start).long()
    cache = pop_cache(kwargs)
    if cache is not None:
        kwargs["cache"] = cache
    mask = kwargs.get("attention_mask")
    past = cache_length(cache)
    if mask is None:
        mask = torch.ones(B, past - N + L if past else L, dtype=torch.long, device=device)
    kwargs["attention_mask"] = torch.cat([front_mask.to(mask.dtype), mask], dim=1)
    pos = kwargs.get("position_ids")
    if pos is None:
        base = past - N if past else 0
        pos = (torch.arange(L, device=device) + base).expand(B, L)
    pos = pos + counts.unsqueeze(1).to(pos.dtype)
    if past:  # a decoding step: the cache already holds every row's front
        kwargs["position_ids"] = pos
        return kwargs
    kwargs["position_ids"] = torch.cat([((col - start).clamp(min=0)).to(pos.dtype), pos], dim=1)
    if embeds is None:
        embeds = input_embeddings(model)(kwargs.pop("input_ids"))
    kwargs.pop("input_ids", None)
    front = embeds.new_zeros(B, N, embeds.shape[-1])
    for i, prompt in enumerate(rows):
        if prompt is not None and prompt.shape[0]:
            front[i, N - prompt.shape[0]:] = prompt.to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([front, embeds], dim=1)
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, N), tt], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == L:
        kwargs["labels"] = torch.cat([labels.new_full((B, N), -100), labels], dim=1)
    return kwargs
