"""``TextualInversionConfig``: the placeholder token, its initializer, the number of vectors, and the rows they take.

Hugging Face PEFT has no textual inversion; the field names follow diffusers' training script
(``examples/textual_inversion/textual_inversion.py``: ``--placeholder_token``, ``--initializer_token``,
``--num_vectors``). The rows (``token_indices``) are the trainable-tokens config's field, which this config extends.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int
from ..trainable_tokens.config import TrainableTokensConfig, check_token_indices


def placeholder_names(token: str, num_vectors: int) -> list[str]:
    """The vocabulary entries of a placeholder: ``<tok>``, ``<tok>_1``, ... (diffusers' multi-vector naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


@dataclasses.dataclass
class TextualInversionConfig(TrainableTokensConfig):
    """Textual inversion (Gal et al. 2022, arXiv 2208.01618): learn the embedding of a new word, nothing else.

    Args:
        placeholder_token: the new word (e.g. ``"<cat-toy>"``); with ``num_vectors > 1`` the tokenizer also gets
            ``<tok>_1`` ... ``<tok>_{n-1}`` (diffusers' naming). Needed by ``add_textual_inversion`` (which adds
            the words to the tokenizer) and by the diffusers file; None with ``token_indices`` naming rows directly.
        initializer_token: a word the tokenizer maps to one token; every vector starts at its embedding. None: the
            rows start where the embedding leaves them (new rows: drawn by the resize, as transformers draws them).
        num_vectors: vectors (tokens) learned for the placeholder; equals ``len(token_indices)`` when both given.
        token_indices: the embedding rows trained, one per vector. Filled by ``add_textual_inversion`` from the
            tokenizer (the ids of the added words); rows beyond the embedding are added (``prepare_model``).
        initializer_index: the id of ``initializer_token`` (filled by ``add_textual_inversion``), or a token id given
            directly; None: no initializer.
        target_modules: None: the model's input embedding (the only layer textual inversion trains).
        init_weights: False draws the rows from a standard normal instead (as trainable tokens).
    """

    PEFT_TYPE: ClassVar[str] = "TEXTUAL_INVERSION"

    token_indices: list[int] | None = None
    placeholder_token: str | None = None
    initializer_token: str | None = None
    num_vectors: int = 1
    initializer_index: int | None = None

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)  # the trainable-tokens checks of token_indices assume a list
        name = type(self).__name__
        check_int(self, "num_vectors", 1)
        check_int(self, "initializer_index", 0, optional=True)
        check_bool(self, "init_weights")
        for key in ("placeholder_token", "initializer_token"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name}.{key}: expected a non-empty string, got {value!r}")
        if self.placeholder_token is not None and self.placeholder_token != self.placeholder_token.strip():
            raise ConfigError(f"{name}.placeholder_token: expected a word without surrounding spaces, got "
                              f"{self.placeholder_token!r}")
        if self.token_indices is not None:
            if isinstance(self.token_indices, tuple):
                self.token_indices = list(self.token_indices)
            check_token_indices(name, "token_indices", self.token_indices, allow_dict=False)
            if len(self.token_indices) != self.num_vectors:
                raise ConfigError(f"{name}.num_vectors: expected the number of token_indices "
                                  f"({len(self.token_indices)}), got {self.num_vectors}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple)):
            raise ConfigError(f"{name}.target_modules: expected None (the input embedding), a name or a list of "
                              f"names, got {self.target_modules!r}")

    @property
    def placeholder_names(self) -> list[str]:
        """``placeholder_token`` and its extra vectors' names (``<tok>_1`` ...), in row order."""
        if self.placeholder_token is None:
            raise ConfigError(f"{type(self).__name__}.placeholder_token: expected the placeholder word, got None")
        return placeholder_names(self.placeholder_token, self.num_vectors)


