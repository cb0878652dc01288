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

The blocks' injection and update are the decoder ones (``layer.py``). Two-stream blocks return a tuple of the text
and image streams; the state rides the image stream (the ``hidden_states`` it is injected into) and is advanced from
that stream's output, found by the block's class in ``IMAGE_STREAM`` (diffusers' SD3 and Flux.1 blocks, Flux2's
single-stream block when it splits). A block whose ``forward`` declares a tuple and is not listed there is refused
when the adapter is added (``check_targets``), as are Flux2's double-stream blocks (its shadow is seeded from a
single-stream block's conditioning and rides their joint text + image sequence). No auxiliary loss (the denoiser takes no
labels), no embedding sharing beyond Flux2's stems, no ``unload_shadow`` (a standalone denoiser needs each
architecture rebuilt, as peft refuses it). File keys as peft's: ``base_model.shadow_backbone.default.<key>``
(``proj_in`` / ``blocks.<i>.{0,1,3}`` for the MLP, ``model.<key>`` for Flux2), ``shadow_projection``.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ...targeting import NotApplicableError
from .config import ShadowConfig
from .flux2 import Flux2Shadow, is_flux2

STACKS = ("single_transformer_blocks", "transformer_blocks")
# Two-stream blocks: the position of the image stream in the tuple each returns, as diffusers 0.42 writes them
# (``return encoder_hidden_states, hidden_states`` in all four; SD3's last block, ``context_pre_only``, returns
# ``(None, hidden_states)``; Flux2's single-stream block returns a tuple only with ``split_hidden_states=True``).
IMAGE_STREAM = {"JointTransformerBlock": 1, "FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1,
                "Flux2SingleTransformerBlock": 1}


def is_diffusion(model: nn.Module) -> bool:
    """A diffusers-style transformer (peft's test)."""
    return isinstance(getattr(model, "single_transformer_blocks", None), nn.ModuleList) or (
        isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList)
        and not isinstance(getattr(model, "layers", None), nn.ModuleList))


def stack(model: nn.Module) -> str:
    return next(a for a in STACKS if isinstance(getattr(model, a, None), nn.ModuleList))


def image_stream(block: nn.Module) -> int | None:
    """Where ``block``'s returned tuple holds the image stream; None: not known (a block returning a tensor)."""
    return IMAGE_STREAM.get(type(block).__name__)


def returns_tuple(block: nn.Module) -> bool:
    """Whether ``block``'s ``forward`` declares a tuple return (two streams)."""
    try:
        annotation = inspect.signature(type(block).forward).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is not inspect.Signature.empty and "tuple" in str(annotation).lower()


def check_targets(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    """Refuse (before the model changes) the blocks the shadow state cannot ride: Flux2's double-stream blocks, and
    two-stream blocks whose image stream is not known."""
    name = type(model).__name__
    if is_flux2(model):
        double = [p for p, _ in blocks if not p.startswith("single_transformer_blocks.")]
        if double:
            raise NotApplicableError(
                f"ShadowPEFT on {name}: target_modules {double} are not single-stream blocks; the Flux2 shadow is "
                "seeded from a single-stream block's conditioning (temb_mod) and rides the single-stream blocks' joint "
                "text + image sequence, which the double-stream blocks do not carry; target "
                "single_transformer_blocks.<i> only (peft fails there too)")
    for path, block in blocks:
        if image_stream(block) is None and returns_tuple(block):
            raise NotApplicableError(
                f"ShadowPEFT on {name}: the block {path!r} ({type(block).__name__}) returns a tuple of streams whose "
                f"image stream peftkit does not know (known: {', '.join(IMAGE_STREAM)}); the shadow state would be "
                "advanced from the wrong stream")


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
        """Names (under this network) of trainable parameters the seed never reaches (a pretrained shadow's stems are
        frozen, not listed)."""
        if not isinstance(self.backbone, Flux2Shadow):
            return set()
        prefixes = tuple(f"backbone.model.{p}." for p in self.backbone.unused_prefixes())
        return {n for n, p in self.named_parameters() if p.requires_grad and n.startswith(prefixes)}

    def seed_block(self, hidden: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        """``s^(0)`` from the first wrapped block's input ``hidden`` and the rest of its call."""
        return self.projection(self.backbone(hidden, args, kwargs))
