"""Cartridges (Eyuboglu et al. 2025, "Cartridges: Lightweight and general-purpose long context representations
via self-study", arXiv 2506.06266): a long corpus compressed offline into a small trained KV cache, served as a
key/value prefix in front of every attention layer:

    Attn_l(q, [Z_k^l; K], [Z_v^l; V])        Z (n, 2 L d) trained directly, one key and one value per layer

The mechanism is prefix tuning's without its reparameterisation MLP (``methods.prompt.prefix_tuning``: the same
layout of the flat prefix, the same KV-cache injection, ``generate`` with and without a cache). What differs is
the parameterisation: the first ``f = num_frozen_tokens`` rows of ``Z`` never train (the paper freezes the first
token, an attention sink, for stability), so ``Z = [Z_frozen (f, 2 L d); Z_train (n - f, 2 L d)]`` and
``(n - f) 2 L d`` parameters train. Grouped-query models store the key/value heads' width
(``d = head_dim * num_key_value_heads``), as Hugging Face PEFT fills it.

Initialisation as PEFT's ``CartridgeEncoder``: both parts normal (std 1, as ``nn.Embedding``), frozen part drawn
first. The paper's preferred start, the KV cache of the corpus' first ``n`` tokens, is a separate step:
``initialize_kv_prefix_from_text`` / ``initialize_kv_prefix_from_past_key_values``; several trained cartridges
compose by concatenation with ``compose_cartridge_adapters`` (``methods.prompt.cartridge_utils``). The paper's
self-study training (synthetic conversations about the corpus, context distillation) is a data recipe, not part
of the adapter, in PEFT as here.

File key as PEFT: ``prompt_embeddings`` (n, 2 L d), the whole ``Z`` (frozen rows first); a load splits it again.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError, check_int
from ...registry import register_method
from .base import PromptLearningConfig
from .prefix_tuning import PrefixAdapter


@dataclasses.dataclass
class CartridgeConfig(PromptLearningConfig):
    """Cartridge configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        num_frozen_tokens: the first ``f`` virtual tokens of the cartridge that never train (the paper freezes
            the first one, an attention sink); ``0 <= f <= num_virtual_tokens``.
    """

    PEFT_TYPE: ClassVar[str] = "CARTRIDGE"

    num_frozen_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_frozen_tokens", 0)
        n = self.num_virtual_tokens
        self._check(n is None or self.num_frozen_tokens <= n, "num_frozen_tokens",
                    f"an integer <= num_virtual_tokens ({n})")


@register_method(
    "cartridge",
    config=CartridgeConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="(n - f) * 2 L d (f = num_frozen_tokens rows of the n x 2 L d prefix frozen)",
    position="key/value prefixes in every attention layer (through the KV cache), the first f frozen",
    paper="arXiv 2506.06266 (Eyuboglu et al. 2025, Cartridges)",
    examples={"cartridge": {"num_virtual_tokens": 4},
              "cartridge-unfrozen": {"num_virtual_tokens": 3, "num_frozen_tokens": 0}},
)
class CartridgeAdapter(PrefixAdapter):
    """The cartridge of one adapter: ``frozen_embedding`` (f, 2 L d; None when f = 0) and ``trainable_embedding``
    (n - f, 2 L d), as PEFT's ``CartridgeEncoder``; the prefix is their concatenation."""

    method = "cartridge"

    def __init__(self, base: nn.Module, config: CartridgeConfig, key: str = "", init: bool = True) -> None:
        nn.Module.__init__(self)  # not PrefixAdapter's: no embedding, no MLP
        n, f, d, L = config.num_virtual_tokens, config.num_frozen_tokens, config.token_dim, config.num_layers
        if f > n:  # the config checks it too; fields set after construction reach here
            raise ConfigError(f"CartridgeConfig.num_frozen_tokens: expected an integer in [0, num_virtual_tokens={n}], "
                              f"got {f}")
        self.n, self.num_layers, self.heads, self.submodules = n, L, config.num_attention_heads, \
            config.num_transformer_submodules
        self.head_dim = d // config.num_attention_heads
        self.project = False
        self.num_frozen_tokens, self.num_trainable_tokens = f, n - f
        device = base.weight.device
        hidden = 2 * L * d
        self.frozen_embedding = nn.Parameter(torch.empty(f, hidden, device=device), requires_grad=False) if f \
            else None
        self.trainable_embedding = nn.Parameter(torch.empty(n - f, hidden, device=device))
        with torch.no_grad():  # PEFT's draw order: the frozen rows first
            if self.frozen_embedding is not None:
                nn.init.normal_(self.frozen_embedding)
            nn.init.normal_(self.trainable_embedding)

    @classmethod
    def param_count(cls, base: nn.Module, config: CartridgeConfig, key: str = "") -> int:
        return (config.num_virtual_tokens - config.num_frozen_tokens) * 2 * config.num_layers * config.token_dim

    def requires_grad_(self, requires_grad: bool = True) -> "CartridgeAdapter":
        self.trainable_embedding.requires_grad_(requires_grad)  # the frozen rows never train
        return self

    @property
    def weight(self) -> Tensor:
        """Z: (n, 2 L d), the frozen rows first (PEFT's ``CartridgeEncoder.weight``)."""
        if self.frozen_embedding is None:
            return self.trainable_embedding
        return torch.cat([self.frozen_embedding, self.trainable_embedding], dim=0)

    def flat_prefix(self) -> Tensor:
        return self.weight

    @torch.no_grad()
    def load_prompt_embeddings(self, prompt_embeddings: Tensor) -> None:
        """Copy a flat prefix (n, 2 L d) into the two parts (PEFT's ``CartridgeEncoder.load_prompt_embeddings``)."""
        n = self.num_frozen_tokens + self.num_trainable_tokens
        if prompt_embeddings.ndim != 2 or tuple(prompt_embeddings.shape) != (n, self.trainable_embedding.shape[1]):
            raise ValueError(f"cartridge prompt_embeddings: expected shape {(n, self.trainable_embedding.shape[1])}, "
                             f"got {tuple(prompt_embeddings.shape)}")
        self._tied().copy_(prompt_embeddings)

    def _tied(self) -> Tensor:
        """One (n, 2 L d) tensor holding both parts' storage (each part becomes a view of its rows, the same
        ``Parameter`` objects): a copy into it, as a load makes, sets both. A device move unties them again,
        harmlessly: each call ties afresh."""
        if self.frozen_embedding is None:
            return self.trainable_embedding
        f = self.num_frozen_tokens
        full = torch.cat([self.frozen_embedding.detach(), self.trainable_embedding.detach()], dim=0)
        self.frozen_embedding.data = full[:f]
        self.trainable_embedding.data = full[f:]
        return full

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        if for_save:
            return {"prompt_embeddings": self.weight.detach()}
        return {"prompt_embeddings": self._tied()}
