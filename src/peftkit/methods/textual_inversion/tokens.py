"""The tokenizer side of textual inversion, and diffusers' file.

``add_textual_inversion(model, tokenizer, config)``: checks the placeholder and the initializer against the
tokenizer before anything changes, adds the placeholder's words to the tokenizer (ids ``len(tokenizer)`` on, as
diffusers' ``load_textual_inversion`` adds them), writes their ids and the initializer's into the config and
returns ``get_peft_model(model, config)`` (which grows the embedding). ``save_textual_inversion`` writes
``{placeholder_token: (n_vectors, d)}`` (``learned_embeds.safetensors`` in a folder, or the file named), the
format ``StableDiffusionPipeline.load_textual_inversion`` reads.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ...config import ConfigError
from ...io import atomic_write
from ...layers import adapter_layers
from ...model import PeftModel, get_peft_model
from .config import TextualInversionConfig, placeholder_names
from .functional import diffusers_entry
from .layer import OWNER, TextualInversionAdapter, check_target, embedding_of

WEIGHTS_NAME = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
WEIGHTS_NAME_BIN = "learned_embeds.bin"  # diffusers' TEXT_INVERSION_NAME


def check_tokenizer(tokenizer: Any, config: TextualInversionConfig) -> tuple[list[str], int | None]:
    """The placeholder's words (none already in the vocabulary) and the initializer's id (one token), or
    ``ConfigError`` naming the field. Reads the tokenizer only."""
    names = config.placeholder_names
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab]
    if taken:
        raise ConfigError(f"{OWNER}.placeholder_token: expected a word not in the tokenizer's vocabulary, got "
                          f"{config.placeholder_token!r}: {taken} already there (ids "
                          f"{[vocab[n] for n in taken]}); pick another placeholder")
    if config.initializer_token is None:
        return names, config.initializer_index
    ids = tokenizer.encode(config.initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{OWNER}.initializer_token: expected a word the tokenizer maps to a single token, got "
                          f"{config.initializer_token!r} -> {len(ids)} tokens {pieces}")
    if config.initializer_index is not None and config.initializer_index != ids[0]:
        raise ConfigError(f"{OWNER}.initializer_index: expected the id of initializer_token "
                          f"{config.initializer_token!r} ({ids[0]}) or None, got {config.initializer_index}")
    return names, int(ids[0])


def add_textual_inversion(model: nn.Module, tokenizer: Any, config: TextualInversionConfig,
                          adapter_name: str = "default") -> PeftModel:
    """Add ``config.placeholder_token`` (and ``<tok>_1`` ... for ``num_vectors > 1``) to ``tokenizer`` and a
    textual-inversion adapter training their rows to ``model`` (a text encoder such as ``CLIPTextModel``, or a
    ``PeftModel`` holding one, which gets the adapter as ``adapter_name``). Bad input raises before the tokenizer
    or the model changes."""
    if not isinstance(config, TextualInversionConfig):
        raise TypeError(f"add_textual_inversion: expected a TextualInversionConfig, got {type(config).__name__}")
    if config.token_indices is not None:
        raise ConfigError(f"{OWNER}.token_indices: expected None (add_textual_inversion takes the added words' ids "
                          f"from the tokenizer), got {config.token_indices}")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete it first")
    names, start = check_tokenizer(tokenizer, config)
    path, module, emb = embedding_of(base)
    check_target(config, path)
    first = len(tokenizer)
    ids = list(range(first, first + len(names)))
    if start is not None and start >= emb.num_embeddings:
        raise ConfigError(f"{OWNER}.initializer_token: its id {start} lies beyond {path!r} ({emb.num_embeddings} rows)")
    if max(ids) >= emb.num_embeddings and module is not emb:
        raise ConfigError(f"{OWNER}.placeholder_token: {path!r} already carries an adapter and cannot grow; add "
                          "every placeholder before the first adapter on the embedding")
    config.token_indices, config.initializer_index = ids, start
    tokenizer.add_tokens(names)
    added = tokenizer.convert_tokens_to_ids(names)
    if added != ids:  # a tokenizer that numbers added words otherwise
        config.token_indices = list(added)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        return model
    return get_peft_model(model, config, adapter_name=adapter_name)


def _adapter(model: PeftModel, adapter_name: str) -> TextualInversionAdapter:
    for _, layer in adapter_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, TextualInversionAdapter) and not adapter.tied:
            return adapter
    raise ValueError(f"save_textual_inversion: adapter {adapter_name!r} is not a textual-inversion adapter")


def textual_inversion_rows(model: nn.Module, tokenizer: Any = None, *, adapter_name: str = "default",
                           placeholder_token: str | None = None) -> tuple[str, Tensor]:
    """(placeholder, its rows (n, d)): from the adapter of a ``PeftModel``, or, for a plain text encoder (after
    ``merge_and_unload``), from its embedding at the ids ``tokenizer`` gives ``<tok>``, ``<tok>_1`` ..."""
    if isinstance(model, PeftModel):
        config = model.peft_config[adapter_name]
        if not isinstance(config, TextualInversionConfig):
            raise ValueError(f"save_textual_inversion: adapter {adapter_name!r} is a {type(config).__name__}")
        token = placeholder_token or config.placeholder_token
        if token is None:
            raise ConfigError(f"{OWNER}.placeholder_token: expected the placeholder word (diffusers' file is keyed "
                              "by it), got None; pass placeholder_token=")
        if tokenizer is not None:
            ids = tokenizer.convert_tokens_to_ids(placeholder_names(token, config.num_vectors))
            if ids != config.token_indices:
                raise ValueError(f"save_textual_inversion: the tokenizer maps {token!r} to {ids}, the adapter trains "
                                 f"rows {config.token_indices}")
        return token, _adapter(model, adapter_name).trainable_tokens_delta
    if tokenizer is None or placeholder_token is None:
        raise ValueError("save_textual_inversion: a plain text encoder needs the tokenizer and placeholder_token")
    vocab = tokenizer.get_vocab()
    if placeholder_token not in vocab:
        raise ValueError(f"save_textual_inversion: {placeholder_token!r} is not in the tokenizer's vocabulary")
    n = 1
    while f"{placeholder_token}_{n}" in vocab:
        n += 1
    ids = [vocab[w] for w in placeholder_names(placeholder_token, n)]
    weight = embedding_of(model)[2].weight
    return placeholder_token, weight[torch.tensor(ids, device=weight.device)]


def save_textual_inversion(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *,
                           adapter_name: str = "default", placeholder_token: str | None = None,
                           safe_serialization: bool = True) -> str:
    """Write the placeholder's embedding in diffusers' format, ``{placeholder_token: (n_vectors, d)}``; returns
    the file. ``path``: a folder (the file is ``learned_embeds.safetensors``, or ``.bin`` without
    ``safe_serialization``) or a file name ending in ``.safetensors`` / ``.bin``. ``tokenizer`` may be None for a
    ``PeftModel`` (the config names the rows); given, it must map the placeholder to those rows."""
    token, rows = textual_inversion_rows(model, tokenizer, adapter_name=adapter_name,
                                         placeholder_token=placeholder_token)
    entry = diffusers_entry(token, rows)
    path = os.fspath(path)
    if path.endswith((".safetensors", ".bin")):
        folder, target = os.path.dirname(path) or ".", path
        safe = path.endswith(".safetensors")
    else:
        folder, safe = path, safe_serialization
        target = os.path.join(path, WEIGHTS_NAME if safe else WEIGHTS_NAME_BIN)
    os.makedirs(folder, exist_ok=True)
    if safe:
        atomic_write(target, lambda tmp: save_file(entry, tmp))
    else:
        atomic_write(target, lambda tmp: torch.save(entry, tmp))
    return target
