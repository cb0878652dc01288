"""The textual-inversion adapter: the placeholder's rows of the input embedding, trained; everything else frozen.

Gal et al. 2022 (arXiv 2208.01618) invert a few images into a new word ``S*``: a token ``<tok>`` is added to the
text encoder's vocabulary and only its embedding ``v*`` (d) is optimised, ``v* = argmin_v E ||eps - eps_theta(z_t,
t, c_theta(y(S* -> v)))||^2``; the text encoder and the generator stay frozen. diffusers' multi-vector variant
learns ``n`` embeddings, the tokens ``<tok>``, ``<tok>_1``, ..., ``<tok>_{n-1}``, which the prompt spells out.

The rows are those of the trainable-tokens method (``methods/trainable_tokens``, whose adapter this extends): the
embedding runs as usual and the positions holding a placeholder read the adapter's ``trainable_tokens_delta``
(n, d) instead (the new values, not a difference); merging writes them into the embedding. What textual
inversion adds: ``prepare_model`` grows the embedding to hold rows that do not exist yet (transformers'
``resize_token_embeddings``, which also grows a tied LM head) and gives the new rows the initializer's embedding,
so that right after ``get_peft_model`` the model reads the placeholder as its initializer word, and each vector
starts at the initializer token's row (the paper's "single-word" initialisation).

File keys: ``base_model.model.<embedding path>.trainable_tokens_delta`` (n, d) in the adapter file; diffusers'
file (``save_textual_inversion``): ``{placeholder_token: (n, d)}`` in ``learned_embeds.safetensors``, which
``StableDiffusionPipeline.load_textual_inversion`` reads. The adapter file's config keeps ``token_indices``, so
loading it onto the plain encoder grows the embedding again.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ...config import ConfigError
from ...registry import register_method
from ...targeting import NotApplicableError, is_target
from ..trainable_tokens.layer import TrainableTokensAdapter, _unwrap, input_embedding_path
from .config import TextualInversionConfig
from .functional import initializer_rows

OWNER = "TextualInversionConfig"


def embedding_of(model: nn.Module) -> tuple[str, nn.Module, nn.Embedding]:
    """(path, module at the path, the nn.Embedding under any wrapper) of the model's input embedding."""
    path = input_embedding_path(model)
    if path is None:
        raise NotApplicableError(f"{OWNER}: {type(model).__name__} has no input token embedding "
                                 "(get_input_embeddings); textual inversion trains rows of one")
    module = model.get_submodule(path)
    base = _unwrap(module)
    if not isinstance(base, nn.Embedding):
        raise NotApplicableError(f"{OWNER}: the input embedding {path!r} of {type(model).__name__} is a "
                                 f"{type(base).__name__}, not an nn.Embedding")
    return path, module, base


def check_target(config: Any, path: str) -> None:
    """``target_modules`` is None or selects the input embedding at ``path``."""
    if config.target_modules is not None and not is_target(config, path, config.target_modules):
        raise ConfigError(f"{OWNER}.target_modules: expected None or the input embedding {path!r} (textual "
                          f"inversion trains its rows only), got {config.target_modules!r}")


@register_method(
    "textual_inversion",
    config=TextualInversionConfig,
    category="prompt",
    modalities=("generation", "text", "vision-language"),
    mergeable=True,
    param_formula="n d (n vectors of the placeholder token, embedding width d)",
    position="the placeholder token's new rows of the input embedding",
    paper="Gal et al. 2022, arXiv 2208.01618",
    examples={"textual_inversion": {"num_vectors": 16, "token_indices": list(range(0, 96, 6))}},
)
class TextualInversionAdapter(TrainableTokensAdapter):
    auxiliary_field: ClassVar[str | None] = None  # LoRA's trainable_token_indices stay the trainable-tokens method's

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        start = getattr(config, "initializer_index", None)
        if init and start is not None and config.init_weights and self.trainable_tokens_delta is not None:
            with torch.no_grad():
                rows = initializer_rows(base.weight, start, len(self.token_indices))
                self.trainable_tokens_delta.copy_(rows.to(self.trainable_tokens_delta.dtype))

    @classmethod
    def prepare_model(cls, model: nn.Module, config: Any) -> None:
        """Check the rows against the input embedding and grow it when they lie beyond it (new rows: the
        initializer's embedding when there is one). Everything is checked before the model changes."""
        if config.token_indices is None:
            raise ConfigError(f"{OWNER}.token_indices: expected the placeholder's embedding rows, got None; add the "
                              "placeholder with add_textual_inversion(model, tokenizer, config), which fills them "
                              "from the tokenizer, or name the rows")
        path, module, base = embedding_of(model)
        check_target(config, path)
        rows = base.num_embeddings
        start = config.initializer_index
        if start is not None and start >= rows:
            raise ConfigError(f"{OWNER}.initializer_index: expected a token id below {rows} (the rows of {path!r}), "
                              f"got {start}")
        needed = max(config.token_indices) + 1
        if needed <= rows:
            return
        if module is not base:
            raise ConfigError(f"{OWNER}.token_indices: rows up to {needed - 1} lie beyond {path!r} ({rows} rows), "
                              "which already carries an adapter and cannot grow; add every placeholder before the "
                              "first adapter on the embedding")
        resize = getattr(model, "resize_token_embeddings", None)
        if resize is None:
            raise ConfigError(f"{OWNER}.token_indices: rows up to {needed - 1} lie beyond {path!r} ({rows} rows) and "
                              f"{type(model).__name__} has no resize_token_embeddings to add them")
        resize(needed)  # transformers: new rows drawn from the old rows' mean and covariance; a tied head follows
        if start is not None:
            weight = model.get_input_embeddings().weight
            with torch.no_grad():
                weight[rows:needed].copy_(initializer_rows(weight, start, needed - rows))

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        embedding_of(model)  # a model without a token embedding: not applicable
        return super().select_targets(model, named, config)
