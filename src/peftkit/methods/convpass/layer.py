"""Convpass (Jie & Deng 2022, "Convolutional Bypasses Are Better Vision Transformer Adapters", arXiv 2208.07463).

A trainable convolutional bypass runs beside each sublayer of every ViT block, reading the sublayer's input
(the LayerNorm's output) and adding to its output:

    X' = X  + MHSA(LN1(X)) + s Convpass(LN1(X))
    X''= X' + MLP(LN2(X')) + s Convpass(LN2(X'))

    Convpass(Z) = W_up drop(act(Conv3x3(act(W_down Z))))

``W_down`` (c x d, bias c) and ``W_up`` (d x c, bias d) act per token (1x1 convolutions); the 3x3 convolution
(c x c x 3 x 3, bias c, padding 1) runs over the patch tokens on their 2-D grid, so the bypass carries the
locality bias of a CNN. act is QuickGELU (``x sigmoid(1.702 x)``). The [CLS] token, which has no place on the
grid, goes through the same convolution as a 1 x 1 grid of its own (the official code's convention): with
padding 1 it meets only the kernel's centre tap. Initialisation as the official code: ``W_down`` Xavier-uniform,
the convolution at the identity on its centre tap (``xavier_init=False``) or Xavier-uniform, ``W_up`` and every
bias zero, so the model starts at the base. Parameters per bypass: ``2dc + 9c^2 + 2c + d``.

In transformers' ViT a bypass wraps the block's ``attention`` module (input LN1(X); its output, the first
element of the returned tuple, gets the bypass added before the block's dropout and residual) and its ``mlp``.
File keys (peft has no Convpass): ``<sublayer>.adapter_down.weight`` / ``.bias``, ``adapter_conv.weight`` /
``.bias``, ``adapter_up.weight`` / ``.bias``, as the official module's parameter names. The official code applies
the block's drop-path to the bypass; here it shares the block's dropout on the attention branch. Mixed-adapter
batches (``adapter_names``) are refused: the attention module's output is a tuple that rows cannot be routed in.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES, NotApplicableError, TargetError, find_targets, model_family, role_paths
from ..adapters.bottleneck import adapter_factory, block_dims
from . import functional as CF
from .config import ConvpassConfig


def _attention_paths(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[str]:
    """Each block's self-attention module: the parent of its query projection."""
    return sorted({p.rpartition(".")[0] for p in role_paths(model, named, "query")})


@register_method(
    "convpass",
    config=ConvpassConfig,
    category="additive",
    modalities=("vision",),
    mergeable=False,
    param_formula="2dc + 9c^2 + 2c + d per bypass (two per ViT block)",
    position="convolutional bypass beside each ViT block's attention and MLP",
    changes_structure=True,
    starts_at_base=True,
    paper="arXiv 2208.07463 (Jie & Deng 2022)",
    examples={"convpass": {"dim": 4}},
)
class ConvpassAdapter(Adapter):
    supported_layers = (nn.Module,)
    supports_routing = False
    default_roles = ()
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "down_weight": "adapter_down.weight", "down_bias": "adapter_down.bias",
        "conv_weight": "adapter_conv.weight", "conv_bias": "adapter_conv.bias",
        "up_weight": "adapter_up.weight", "up_bias": "adapter_up.bias",
    }

    def __init__(self, base: nn.Module, config: ConvpassConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        d_out, d_in = block_dims(base)
        if d_out != d_in:
            raise TargetError(f"Convpass: {key!r} maps width {d_in} to {d_out}; a bypass needs a sublayer that keeps "
                              "the token width (a ViT block's attention or MLP)")
        c, kw = config.dim, adapter_factory(base)
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None
        self.down_weight = nn.Parameter(torch.zeros(c, d_in, **kw))  # (c, d)
        self.down_bias = nn.Parameter(torch.zeros(c, **kw))
        self.conv_weight = nn.Parameter(torch.zeros(c, c, 3, 3, **kw))  # (c, c, 3, 3)
        self.conv_bias = nn.Parameter(torch.zeros(c, **kw))
        self.up_weight = nn.Parameter(torch.zeros(d_out, c, **kw))  # (d, c), zero: starts at the base
        self.up_bias = nn.Parameter(torch.zeros(d_out, **kw))
        if init:
            with torch.no_grad():
                nn.init.xavier_uniform_(self.down_weight)
                if config.xavier_init:
                    nn.init.xavier_uniform_(self.conv_weight)
                else:
                    self.conv_weight[:, :, 1, 1] = torch.eye(c, **kw)

    @classmethod
    def param_count(cls, base: nn.Module, config: ConvpassConfig, key: str = "") -> int:
        """Closed form per bypass: down ``c (d + 1)``, conv ``c (9c + 1)``, up ``d (c + 1)``."""
        d, c = block_dims(base)[1], config.dim
        return c * (d + 1) + c * (9 * c + 1) + d * (c + 1)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ConvpassConfig) -> list[str]:
        if config.target_modules is not None:
            paths = find_targets(model, named, config, (), (nn.Module,))
        else:
            if model_family(model) != "vit":
                raise NotApplicableError(
                    f"Convpass: {type(model).__name__} is not a ViT (the bypass reshapes [CLS] + patch tokens to "
                    "their 2-D grid); set target_modules to the sublayers of a ViT-like model")
            found = set(role_paths(model, named, "ffn")) if "ffn" in config.positions else set()
            if "attention" in config.positions:
                found.update(_attention_paths(model, named))
            paths = find_targets(model, named, dataclasses.replace(config, target_modules=sorted(found)), (),
                                 (nn.Module,))
        modules = dict(named)
        for p in paths:  # a clear error before any change
            if not any(isinstance(m, LINEAR_TYPES) for m in modules[p].modules()):
                raise NotApplicableError(
                    f"ConvpassConfig.target_modules: {p!r} is a {type(modules[p]).__name__} without a Linear; a "
                    "bypass sits beside a ViT block's attention or MLP (token sequences of width d)")
            d_out, d_in = block_dims(modules[p])
            if d_out != d_in:
                raise TargetError(f"ConvpassConfig.target_modules: {p!r} maps width {d_in} to {d_out}; a bypass "
                                  "needs a sublayer that keeps the token width (a ViT block's attention or MLP)")
        return paths

    def bypass(self, x: Tensor) -> Tensor:
        """``s Convpass(x)`` for the sublayer input x (B, 1 + n*n, d)."""
        return CF.convpass(x.to(self.down_weight.dtype), self.down_weight, self.down_bias, self.conv_weight,
                           self.conv_bias, self.up_weight, self.up_bias, self.scale, self.dropout)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor | tuple) -> Tensor | tuple:
        if isinstance(out, tuple):  # attention: (output, attention weights)
            return (out[0] + self.bypass(x).to(out[0].dtype), *out[1:])
        return out + self.bypass(x).to(out.dtype)
