"""``TrainableTokensConfig`` (field names and defaults as Hugging Face PEFT 0.21) and the checks of token
indices, shared with ``LoraConfig.trainable_token_indices``."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar

from ...config import ConfigError, PeftConfig, check_bool, is_int


def _bad_indices(value: Any) -> str | None:
    """Why ``value`` is not a list of distinct non-negative ints (None: it is one)."""
    if not isinstance(value, (list, tuple)):
        return f"a list of token indices (ints), got {value!r}"
    for i, v in enumerate(value):
        if not is_int(v):
            return f"token indices as ints, got {v!r} ({type(v).__name__}) at position {i}"
        if v < 0:
            return f"non-negative token indices, got {v} at position {i}"
    if len(set(value)) != len(value):
        dup = sorted({v for v in value if list(value).count(v) > 1})
        return f"distinct token indices, got {dup} more than once"
    return None


def check_token_indices(owner: str, name: str, value: Any, allow_dict: bool) -> None:
    """Raise ``ConfigError`` "<owner>.<name>: expected ..." unless ``value`` is a list of distinct non-negative
    ints, or (``allow_dict``: LoRA's ``trainable_token_indices``) a dict {module name: such a list}."""
    if allow_dict and isinstance(value, dict):
        for key, indices in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{owner}.{name}: expected module names as keys, got {key!r}")
            why = _bad_indices(indices)
            if why:
                raise ConfigError(f"{owner}.{name}[{key!r}]: expected {why}")
        return
    why = _bad_indices(value)
    if why:
        what = "a dict {module name: [indices]} or " if allow_dict else ""
        raise ConfigError(f"{owner}.{name}: expected {what}{why}")


def check_in_vocabulary(owner: str, name: str, indices: list[int], path: str, rows: int) -> None:
    """Every index names a row of the ``rows``-row layer at ``path`` (checked when the model is known)."""
    outside = [i for i in indices if i >= rows]
    if outside:
        raise ConfigError(f"{owner}.{name}: expected token indices below {rows} (the rows of {path!r}), got "
                          f"{outside[:8]}{' ...' if len(outside) > 8 else ''} outside the vocabulary")


@dataclasses.dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens: train only the embedding rows of ``token_indices`` (new or re-trained tokens).

    Args:
        token_indices: the token ids whose embedding rows train (distinct, each below the vocabulary size).
        target_modules: the layer(s) whose rows train (names or a full-match regex); None: the model's input
            embedding (``get_input_embeddings``), written into the config as peft does. Layers tied to the input
            embedding (``tie_word_embeddings``: an LM head) follow it and share its rows.
        init_weights: start each row at the embedding's own row (the identity); False draws the rows from a
            standard normal.
    """

    PEFT_TYPE: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.token_indices, tuple):
            self.token_indices = list(self.token_indices)
        check_token_indices(type(self).__name__, "token_indices", self.token_indices, allow_dict=False)
        check_bool(self, "init_weights")
