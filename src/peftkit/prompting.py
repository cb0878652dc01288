"""Model-level adapters: methods that change a model's *inputs* instead of wrapping a layer.

Prompt tuning, P-tuning and prefix tuning (Lester et al. 2021, Liu et al. 2021, Li & Liang 2021) learn
virtual tokens. Their adapter (a :class:`PromptAdapter`) sits, for bookkeeping, in the ``AdapterLayer`` that
wraps the model's input embedding, so the engine's machinery applies unchanged: named adapters, the active
set, ``disable_adapter``, parameter discovery by type, checkpoint keys, parameter counts. The embedding's own
output is never changed; instead one forward pre-hook on the user's model (installed by the tuner once)
lets the active prompt adapter rewrite the call's keyword arguments:

- input-embedding prompts: ``inputs_embeds = [P; E(input_ids)]``, the attention mask gets ``n`` ones in
  front, given position ids become ``[0..n-1; position_ids + n]``, token-level labels get ``n`` x -100,
  token type ids ``n`` zeros;
- key/value prefixes: a ``transformers`` Cache pre-filled with the prefix, the attention mask extended,
  given position ids shifted by ``n``.

Because the hook sits on the model itself, ``model.generate`` goes through it at every step: the first step
(empty or no cache) injects the virtual tokens; later steps (the cache already holds them) only extend the
mask and shift the positions. Generation with a KV cache therefore equals a no-cache greedy loop over the
adapted forward (Hugging Face PEFT 0.21.2's cached generation does not under transformers 5.x, whose models
take ``cache=`` instead of ``past_key_values=``: PEFT re-injects the prompt at every decoding step).

Key/value prefixes train under activation checkpointing (PEFT 0.21.2 refuses to add prefix tuning to a model
with checkpointing on): the prefix goes in a read-only cache that checkpointed layers may keep, handed for the
call to every layer, including those a backbone passes no cache under checkpointing (GPT-2's); see ``prompt_cache``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .layers import Adapter, AdapterLayer

CACHE_KEYS = ("cache", "past_key_values")  # transformers 5.x name first, the deprecated alias second


class PromptAdapter(Adapter):
    """An adapter that acts on the model's inputs (see the module docstring). Hosted on the input embedding.

    Subclasses implement ``rewrite(model, kwargs) -> kwargs`` and ``file_tensors(for_save)`` (checkpoint key ->
    tensor, keys as written in the file, e.g. Hugging Face PEFT's ``prompt_embeddings``).
    """

    rewrites_inputs: ClassVar[bool] = True
    changes_output: ClassVar[bool] = False  # the embedding's output is left alone; the work happens in ``rewrite``
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return out

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def rewrite_encoder(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a call of an encoder-decoder model's encoder (``generate`` calls it directly)."""
        return kwargs

    def delta_weight(self, base: nn.Module) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__}: prompt methods cannot be merged into the base weights")


# -- the hook ----------------------------------------------------------------------------------------------
def active_prompt(model: nn.Module, layer: nn.Module | None = None) -> PromptAdapter | None:
    """The active, enabled prompt adapter of ``model`` (None when there is none); ``layer``: the model's input
    embedding when the caller has it."""
    layer = input_embeddings(model) if layer is None else layer
    if not isinstance(layer, AdapterLayer) or layer.disable_adapters:
        return None
    found = None
    for name in layer.active_adapters:
        adapter = layer.adapters[name]
        if isinstance(adapter, PromptAdapter):
            if found is not None:
                active = [n for n in layer.active_adapters if isinstance(layer.adapters[n], PromptAdapter)]
                raise ValueError(f"only one prompt adapter can be active at a time; active: {active}")
            found = adapter
    return found


def routed_prompts(model: nn.Module) -> list[Tensor | None] | None:
    """Per batch row, the prompt (n_i, d) of the row's adapter in a routed call (``adapter_names``), None
    for a row without one; None when the call is not routed or no row uses a prompt adapter."""
    layer = input_embeddings(model)
    if not isinstance(layer, AdapterLayer) or layer.disable_adapters or layer.routing is None:
        return None
    used = {n: layer.adapters[n] for n in layer.routing if n in layer.adapters}
    if not any(isinstance(a, PromptAdapter) for a in used.values()):
        return None
    if is_encoder_decoder(model) or not all(hasattr(a, "prompts") for a in used.values()):
        raise NotImplementedError("adapter_names (per-row routing) with prompt methods: only input-embedding "
                                  "prompts (prompt_tuning, p_tuning) on decoder-only or encoder-only models")
    return [used[n].prompts()[: used[n].num_virtual_tokens] if n in used else None for n in layer.routing]


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    layer = input_embeddings(module)
    if getattr(layer, "routing", None) is not None:  # a mixed batch: the rows' adapters decide, not the active one
        rows = routed_prompts(module)
        return None if rows is None else ((), embed_routed_prompts(module, bind_inputs(module, args, kwargs), rows))
    adapter = active_prompt(module, layer)
    if adapter is None:
        return None
    return (), adapter.rewrite(module, bind_inputs(module, args, kwargs))


def _post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    release_layers(module)  # also after an exception (always_call)


def install(model: nn.Module) -> None:
    """Install the input-rewriting hooks on ``model`` and, for encoder-decoder models, on its encoder
    (``generate`` runs the encoder on its own) (idempotent)."""
    if getattr(model, "_peftkit_prompt_hook", None) is not None:
        return
    handles = [model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               model.register_forward_hook(_post_hook, always_call=True)]
    encoder = model.get_encoder() if is_encoder_decoder(model) and hasattr(model, "get_encoder") else None
    if isinstance(encoder, nn.Module):
        def encoder_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            adapter = active_prompt(model)
            if adapter is None:
                return None
            return (), adapter.rewrite_encoder(model, bind_inputs(module, args, kwargs))

        handles.append(encoder.register_forward_pre_hook(encoder_hook, with_kwargs=True))
    model._peftkit_prompt_hook = handles


def uninstall(model: nn.Module) -> None:
    for handle in getattr(model, "_peftkit_prompt_hook", None) or ():
        handle.remove()
    if hasattr(model, "_peftkit_prompt_hook"):
        del model._peftkit_prompt_hook


# -- helpers (pure functions on the call's arguments) ------------------------------------------------------
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
    """Prepend the first ``n`` rows of ``prompts()`` ((>= n, d); called only when the call embeds them, not in a
    decoding step) to the input embeddings of the call (see the module docstring)."""
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
    kwargs["inputs_embeds"] = _cat_prompts(model, kwargs, prompts()[:n])
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
    n = prompts.shape[0]
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
    front = prompts.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
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


from .prompt_cache import release_layers  # noqa: E402  (the KV-prefix machinery; it imports this module)
