"""ShadowPEFT on diffusers transformers (peft's diffusion path): the shadow network of a denoiser.

A diffusers transformer (a ``single_transformer_blocks`` stack, or ``transformer_blocks`` without ``layers``)
is its own backbone; the wrapped stack is ``single_transformer_blocks`` where there is one (Flux's longer
single-stream stack), else ``transformer_blocks``, and the base width is ``hidden_size`` or
``num_attention_heads x attention_head_dim``. Its forward takes latents, not tokens, so ``s^(0)`` is computed
from the first wrapped block's input (post-embedding, at the base width) when that block runs, with that
block's conditioning:

- ``Flux2Transformer2DModel``: a reduced copy of the base (``flux2.py``); another width projects back through
  a bias-free Linear starting as the identity on the leading ``shadow_hidden_size`` channels;
- any other: a token-wise residual MLP (``TokenBackbone``, peft's ``_TokenShadowBackbone``):
  ``x W_in + b`` then per block ``h + MLP(LayerNorm(h))`` at ``shadow_hidden_size`` (default: the base's),
  projected back by a bias-free Linear when the widths differ; no pretrained ``shadow_model``.

The blocks' injection and update are the decoder ones (``layer.py``). No auxiliary loss (the denoiser takes no
labels), no embedding sharing beyond Flux2's stems, no ``unload_shadow`` (a standalone denoiser needs each
architecture rebuilt, as peft refuses it). File keys as peft's: ``base_model.shadow_backbone.default.<key>``
(``proj_in`` / ``blocks.<i>.{0,1,3}`` for the MLP, ``model.<key>`` for Flux2), ``shadow_projection``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .config import ShadowConfig
from .flux2 import Flux2Shadow, is_flux2

STACKS = ("single_transformer_blocks", "transformer_blocks")


def is_diffusion(model: nn.Module) -> bool:
    """A diffusers-style transformer (peft's test)."""
    return isinstance(getattr(model, "single_transformer_blocks", None), nn.ModuleList) or (
        isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList)
        and not isinstance(getattr(model, "layers", None), nn.ModuleList))


def stack(model: nn.Module) -> str:
    return next(a for a in STACKS if isinstance(getattr(model, a, None), nn.ModuleList))


class TokenBackbone(nn.Module):
    """A token-wise residual MLP giving ``s^(0)`` from a block's input (peft's ``_TokenShadowBackbone``)."""

    def __init__(self, in_features: int, hidden: int, num_layers: int = 1, intermediate: int | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.proj_in = nn.Linear(in_features, hidden)
        inner = intermediate or hidden
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
            for _ in range(max(1, int(num_layers)))])

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, hidden: Tensor, args: tuple = (), kwargs: dict[str, Any] | None = None) -> Tensor:
        hidden = self.proj_in(hidden)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return hidden


class DiffusionNetwork(nn.Module):
    """Backbone + projection of a diffusers transformer: ``s^(0) = P(backbone(h, block conditioning))``."""

    share = False
    head = None
    head_is_lm = False
    from_block = True  # seeded by the first wrapped block, not by the model's inputs

    def __init__(self, model: nn.Module, config: ShadowConfig, d: int) -> None:
        super().__init__()
        flux2 = is_flux2(model)
        if config.shadow_model == "mirror":
            backbone = Flux2Shadow.from_base(model, config) if flux2 else TokenBackbone(
                d, config.shadow_hidden_size or d, config.shadow_num_hidden_layers or 1,
                config.shadow_intermediate_size)
        elif flux2:
            backbone = Flux2Shadow.from_folder(model, config.shadow_model)
        else:
            raise ValueError(f"ShadowConfig.shadow_model: pretrained shadow checkpoints ({config.shadow_model!r}) are "
                             f"only supported on Flux2 among diffusers transformers, not {type(model).__name__}; use "
                             "'mirror' (a token-wise MLP backbone)")
        shadow_d = backbone.hidden_size
        projection: nn.Module = nn.Identity()
        if shadow_d != d:
            projection = nn.Linear(shadow_d, d, bias=False)
            if flux2:
                with torch.no_grad():
                    projection.weight.zero_()
                    projection.weight[:shadow_d, :shadow_d].copy_(torch.eye(shadow_d))
        self.backbone = backbone
        self.projection = projection
        self.pretrained = config.shadow_model != "mirror"
        ref = next(model.parameters(), None)
        if ref is not None:
            self.to(device=ref.device, dtype=ref.dtype)

    def requires_grad_(self, requires_grad: bool = True) -> "DiffusionNetwork":
        super().requires_grad_(requires_grad)
        if self.pretrained and isinstance(self.backbone, Flux2Shadow):  # a pretrained Flux2's stems stay frozen
            self.backbone.freeze_stems()
        return self

    def unused_params(self) -> set[str]:
        """Names (under this network) of trainable parameters the seed never reaches."""
        if not isinstance(self.backbone, Flux2Shadow):
            return set()
        prefixes = tuple(f"backbone.model.{p}." for p in self.backbone.unused_prefixes())
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes)}

    def seed_block(self, hidden: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        """``s^(0)`` from the first wrapped block's input ``hidden`` and the rest of its call."""
        return self.projection(self.backbone(hidden, args, kwargs))
