"""Cartridge helpers, as Hugging Face PEFT's ``peft.tuners.cartridge.utils``:

- ``prompt_embeddings_from_past_key_values``: a model's KV cache (per layer keys and values, each
  (1, heads, seq, head_dim)) -> the flat prefix (n, 2 L d) of its first ``n`` positions, PEFT's layout
  (per token: layer 0 keys, layer 0 values, layer 1 keys, ...; heads then head_dim inside each);
- ``initialize_kv_prefix_from_past_key_values`` / ``initialize_kv_prefix_from_text``: the paper's initialisation
  (arXiv 2506.06266, section 4: the KV cache of the corpus' first tokens): load such a prefix into a cartridge
  or prefix-tuning adapter (``prefix_projection=False``); from text, the base model (adapters off) prefills the
  text, as a system message of the tokenizer's chat template when it has one;
- ``compose_cartridge_adapters``: saved cartridges composed by concatenating their prefixes along the tokens
  (the paper's composition), written as one adapter folder whose config is the first's with the summed
  ``num_virtual_tokens`` (its ``num_frozen_tokens`` kept: one attention sink).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...checkpoint import LEGACY_NAME, SAFETENSORS_NAME, read_weights
from ...config import PeftConfig
from .cartridge import CartridgeAdapter, CartridgeConfig
from .prefix_tuning import PrefixAdapter

_KV_TYPES = ("CARTRIDGE", "PREFIX_TUNING")


def _legacy_layers(past_key_values: Any) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) of a legacy tuple cache, a ``transformers`` Cache, or an iterable of pairs."""
    if isinstance(past_key_values, (tuple, list)):
        return [(layer[0], layer[1]) for layer in past_key_values]
    to_legacy = getattr(past_key_values, "to_legacy_cache", None)
    if callable(to_legacy):
        return [(layer[0], layer[1]) for layer in to_legacy()]
    if hasattr(past_key_values, "__iter__"):
        layers = list(past_key_values)
        if layers and isinstance(layers[0], (tuple, list)) and len(layers[0]) >= 2:
            return [(layer[0], layer[1]) for layer in layers]
    raise TypeError("past_key_values: expected a legacy tuple/list of (key, value) pairs, an object with "
                    f"to_legacy_cache(), or an iterable of (key, value) tuples; got {type(past_key_values).__name__}")


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> Tensor:
    """The flat prefix (n, 2 L d) of the first ``num_virtual_tokens`` cached positions of a batch-1 cache."""
    layers = _legacy_layers(past_key_values)
    if not layers:
        raise ValueError("past_key_values: empty (no layers)")
    k0 = layers[0][0]
    if k0.ndim != 4:
        raise ValueError(f"past_key_values: expected keys/values of rank 4 (batch, heads, seq, head_dim), got rank "
                         f"{k0.ndim}")
    if k0.shape[0] != 1:
        raise ValueError(f"past_key_values: expected the cache of one sequence (batch 1), got batch {k0.shape[0]}")
    n, shape = num_virtual_tokens, (1, k0.shape[1])
    for i, (k, v) in enumerate(layers):
        if k.shape[:2] != shape or v.shape[:2] != shape or k.shape[3] != k0.shape[3] or v.shape[3] != k0.shape[3]:
            raise ValueError(f"past_key_values: layer {i}'s keys/values {tuple(k.shape)} / {tuple(v.shape)} differ "
                             f"in heads or head_dim from layer 0's {tuple(k0.shape)}")
        if k.shape[2] < n or v.shape[2] < n:
            raise ValueError(f"past_key_values: need at least {n} cached tokens, layer {i} holds {k.shape[2]}")
    # (n, 2 L, heads, head_dim): per layer its keys then its values, each token's row (heads, head_dim)
    packed = torch.stack([t[0, :, :n].transpose(0, 1) for kv in layers for t in kv], dim=1)
    return packed.reshape(n, -1)


def _kv_adapter(model: Any, adapter_name: str | None) -> tuple[str, Any, Any]:
    """(name, config, adapter) of a cartridge / prefix-tuning adapter of ``model`` (a PeftModel)."""
    name = model.active_adapter if adapter_name is None else adapter_name
    if name not in model.peft_config:
        raise KeyError(f"no adapter named {name!r}; adapters: {sorted(model.peft_config)}")
    config = model.peft_config[name]
    if str(config.peft_type) not in _KV_TYPES:
        raise ValueError(f"Adapter '{name}' must be a CARTRIDGE or PREFIX_TUNING adapter (got {config.peft_type}).")
    if getattr(config, "prefix_projection", False):
        raise ValueError("Initialization from KV cache is not supported for prefix tuning with "
                         "`prefix_projection=True`.")
    adapter = next(a for _, a in model.base_model.adapters(name) if isinstance(a, PrefixAdapter))
    return name, config, adapter


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(model: Any, *, adapter_name: str | None = None,
                                              past_key_values: Any, num_virtual_tokens: int | None = None) -> Tensor:
    """Load the first ``num_virtual_tokens`` (default: the adapter's) positions of ``past_key_values`` into a
    cartridge or prefix-tuning adapter (default: the active one); returns the loaded flat prefix (n, 2 L d)."""
    _, config, adapter = _kv_adapter(model, adapter_name)
    n = config.num_virtual_tokens if num_virtual_tokens is None else num_virtual_tokens
    prompt_embeddings = prompt_embeddings_from_past_key_values(past_key_values, num_virtual_tokens=n)
    if isinstance(adapter, CartridgeAdapter):
        adapter.load_prompt_embeddings(prompt_embeddings)
    else:  # prefix tuning without the MLP: the prefix is its embedding
        target = adapter.embedding.weight
        if tuple(target.shape) != tuple(prompt_embeddings.shape):
            raise ValueError(f"prefix prompt_embeddings: expected shape {tuple(target.shape)}, got "
                             f"{tuple(prompt_embeddings.shape)}")
        target.copy_(prompt_embeddings)
    return prompt_embeddings


@torch.no_grad()
def initialize_kv_prefix_from_text(model: Any, tokenizer: Any, *, text: str, adapter_name: str | None = None,
                                   num_virtual_tokens: int | None = None, use_chat_template: bool = True,
                                   max_length: int | None = None) -> Tensor:
    """Prefill the base model (adapters off) on ``text`` and load its cache's first positions into the adapter
    (see ``initialize_kv_prefix_from_past_key_values``). With ``use_chat_template`` and a tokenizer that has a chat
    template, ``text`` is tokenized as a system message (PEFT's rule); ``max_length`` truncates."""
    name, config, _ = _kv_adapter(model, adapter_name)
    n = config.num_virtual_tokens if num_virtual_tokens is None else num_virtual_tokens

    def plain() -> Tensor:
        return tokenizer(text, return_tensors="pt", truncation=max_length is not None, max_length=max_length)[
            "input_ids"]

    input_ids = None
    if use_chat_template and hasattr(tokenizer, "apply_chat_template"):
        try:
            input_ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                                      add_generation_prompt=False, return_dict=False,
                                                      return_tensors="pt")
        except (TypeError, ValueError):  # no chat template, or a tokenizer without this signature
            input_ids = None
        else:
            input_ids = input_ids[:, :max_length] if max_length is not None else input_ids
    input_ids = (plain() if input_ids is None else input_ids).to(model.device)
    with model.disable_adapter():
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    cache = outputs.get("cache")
    cache = outputs.get("past_key_values") if cache is None else cache
    return initialize_kv_prefix_from_past_key_values(model, adapter_name=name, past_key_values=cache,
                                                     num_virtual_tokens=n)


def compose_cartridge_adapters(adapter_paths: Sequence[str | os.PathLike], *, output_path: str | os.PathLike,
                               safe_serialization: bool = True) -> None:
    """Write to ``output_path`` the cartridge made of the saved cartridges ``adapter_paths`` (at least two, same
    model and task) concatenated along the tokens, in order."""
    paths = [Path(p) for p in adapter_paths]
    if len(paths) < 2:
        raise ValueError("compose_cartridge_adapters: need at least 2 adapters to compose")
    configs = [PeftConfig.from_pretrained(p) for p in paths]
    for p, cfg in zip(paths, configs):
        if not isinstance(cfg, CartridgeConfig):
            raise ValueError(f"Adapter at '{p}' is not a CARTRIDGE adapter (got {cfg.peft_type}).")
    first = configs[0]
    for p, cfg in zip(paths[1:], configs[1:]):
        for attr in ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            if getattr(cfg, attr) != getattr(first, attr):
                raise ValueError(f"Incompatible CARTRIDGE configs for attribute '{attr}': {getattr(cfg, attr)!r} at "
                                 f"'{p}', {getattr(first, attr)!r} at '{paths[0]}'.")
    composed = torch.cat([read_weights(str(p))[0]["prompt_embeddings"] for p in paths], dim=0)
    out = dataclasses.replace(first, num_virtual_tokens=composed.shape[0])
    output = Path(output_path)
    output.mkdir(parents=True, exist_ok=True)
    out.save_pretrained(output)
    if safe_serialization:
        save_file({"prompt_embeddings": composed.contiguous()}, str(output / SAFETENSORS_NAME))
    else:
        torch.save({"prompt_embeddings": composed}, str(output / LEGACY_NAME))


__all__ = ["compose_cartridge_adapters", "initialize_kv_prefix_from_past_key_values", "initialize_kv_prefix_from_text",
           "prompt_embeddings_from_past_key_values"]
