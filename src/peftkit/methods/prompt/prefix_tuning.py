"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv 2101.00190) and P-tuning v2 (Liu et al. 2022, arXiv 2110.07602).

Every attention layer l attends over learned keys and values in front of its own:
``Attn(q, [P_k^l; K], [P_v^l; V])``, with ``P^l`` of shape (n, d) per layer for keys and values. The flat
prefix ``P`` (n, 2 L d) is either learned directly or produced by a reparameterisation MLP
``Linear(d, h) - tanh - Linear(h, 2 L d)`` over an embedding (n, d) (``prefix_projection=True``); the MLP is
dropped after training: the checkpoint holds its output, ``prompt_embeddings`` (n, 2 L d), as in PEFT.

The prefix goes in through the model's KV cache (a ``transformers`` DynamicCache; the decoder's self-attention
cache for encoder-decoder models) with the attention mask extended by n ones, so it works with ``generate``
with and without a cache (see ``methods.prompt.hook``). On grouped-query models the prefix has the key/value
heads' width (``token_dim = head_dim * num_key_value_heads``), as PEFT fills it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .cache import prefix_kv
from ...registry import register_method
from .base import KVPrompt, PromptLearningConfig


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        encoder_hidden_size: hidden width h of the reparameterisation MLP (None: token_dim).
        prefix_projection: learn the prefix through the MLP (True) or directly (False, the default).
        init_weights: None (random) or "zero" (the prefix, or the MLP's last layer, starts at zero).
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.init_weights in (None, "zero"), "init_weights", 'None or "zero"')
        self._check(isinstance(self.prefix_projection, bool), "prefix_projection", "True or False")


class PrefixAdapter(KVPrompt):
    """The learned prefix of one adapter. Loaded from a file (or in inference mode) it holds the MLP's output
    directly, as PEFT does: the file has no MLP weights."""

    def __init__(self, base: nn.Module, config: PrefixTuningConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        n, d, L = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.n, self.num_layers, self.heads, self.submodules = n, L, config.num_attention_heads, \
            config.num_transformer_submodules
        self.head_dim = d // config.num_attention_heads
        self.project = config.prefix_projection and init and not config.inference_mode
        device = base.weight.device
        if self.project:
            self.embedding = nn.Embedding(n, d, device=device)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size, device=device), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, 2 * L * d, device=device))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, 2 * L * d, device=device)  # P: (n, 2 L d)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @classmethod
    def param_count(cls, base: nn.Module, config: PrefixTuningConfig, key: str = "") -> int:
        n, d, L, h = config.num_virtual_tokens, config.token_dim, config.num_layers, config.encoder_hidden_size
        if config.prefix_projection and not config.inference_mode:
            return n * d + (d * h + h) + (h * 2 * L * d + 2 * L * d)
        return n * 2 * L * d

    def flat_prefix(self) -> Tensor:
        """P: (n, 2 L d); through the MLP when projecting (computed on (1, n, d), as PEFT saves it)."""
        if self.project:
            return self.transform(self.embedding.weight.unsqueeze(0))[0]
        return self.embedding.weight

    def layers(self, batch: int, dtype: torch.dtype | None = None, separate: bool = False
               ) -> list[tuple[Tensor, Tensor]]:
        """Per layer (keys, values), each (batch, heads, n, head_dim); PEFT's layout of the flat prefix.
        ``separate``: with the MLP, each layer's pair comes from its own run of it (its own autograd graph)."""
        if separate and self.project:
            return [self.layers(batch, dtype)[i] for i in range(self.num_layers)]
        p = self.flat_prefix()
        p = p.to(dtype) if dtype is not None else p
        p = p.view(1, self.n, 2 * self.num_layers, self.heads, self.head_dim).expand(batch, -1, -1, -1, -1)
        if self.submodules == 2:  # PEFT's encoder-decoder layout: the prefix twice, in groups of 4 per layer
            p = torch.cat([p, p], dim=2)
        kv = p.permute(2, 0, 3, 1, 4).split(2 * self.submodules)
        return [(group[0], group[1]) for group in kv]

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        dtype = getattr(model, "dtype", None)
        return prefix_kv(model, kwargs, self.n, lambda batch, separate=False: self.layers(batch, dtype, separate))

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        if for_save:
            return {"prompt_embeddings": self.flat_prefix().detach()}
        if self.project:
            raise NotImplementedError("a prefix file holds the MLP's output; it loads into an adapter built "
                                      "without the MLP (from_pretrained / load_adapter do that)")
        return {"prompt_embeddings": self.embedding.weight}


@register_method(
    "prefix_tuning",
    config=PrefixTuningConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="n * 2 L d (prefix_projection: n d + d h + h + 2 L d (h + 1))",
    position="key/value prefixes in every attention layer (through the KV cache)",
    paper="arXiv 2101.00190 (Li & Liang 2021, prefix tuning)",
    examples={"prefix": {"num_virtual_tokens": 4},
              "prefix-projection": {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 8}},
)
class PrefixTuningAdapter(PrefixAdapter):
    method = "prefix_tuning"
