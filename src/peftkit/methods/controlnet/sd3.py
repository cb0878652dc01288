"""ControlNet on a diffusers ``SD3Transformer2DModel`` (MMDiT, Stable Diffusion 3), with diffusers' own
``SD3ControlNetModel``.

A trainable copy of the transformer's input side (patch embedding, time-and-pooled-text embedding, caption
projection) and of its first ``n`` joint blocks reads the noisy latent, the timestep, the text and a conditioning
latent (through a zero-initialised patch embedding added to the image tokens); one zero-initialised Linear per copied
block turns its image tokens into a residual that is added after the transformer's blocks:

    h_0 = P(z_t) + P_c(c)   (P: the patch embedding copy, P_c: zero patch embedding of the conditioning latent c)
    r_j = s Z_j(image tokens after copied block j)      (Z: zero Linears, s: conditioning_scale)
    eps = SD3(z_t, t, text; image tokens after block i += r_{floor(i n / N)})   (N: the transformer's blocks; the
          last block, context-pre-only, takes none)

All of it is diffusers' own: the network is ``SD3ControlNetModel.from_transformer`` (weights copied, the zero parts
zero), its residuals go in as the transformer's ``block_controlnet_hidden_states``, spread over the blocks by the
transformer itself. The zero parts make the adapted transformer equal the base at the start. As diffusers'
``StableDiffusion3ControlNetPipeline``, the network reads zeros for the pooled text when its config's
``force_zeros_for_pooled_projection`` is set (``ControlNetConfig.force_zeros_for_pooled_projection``, default True).

The conditioning latent: ``model(hidden_states=z, timestep=t, encoder_hidden_states=..., pooled_projections=...,
controlnet_cond=c)``, ``c`` ``(batch, in_channels + extra_conditioning_channels, H, W)`` for ``z`` ``(batch,
in_channels, H, W)``: a VAE-encoded image, as the pipeline passes it (``(vae.encode(image) - shift) * scaling``, the
shift 0 when ``force_zeros_for_pooled_projection``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ...targeting import NotApplicableError
from .config import ControlNetConfig
from .side import PlainPart

# the transformer parts SD3ControlNetModel.from_transformer copies
PARTS = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks")
DEFAULT_LAYERS = 12  # SD3ControlNetModel.from_transformer's num_layers


def is_sd3_config(controlnet_config: dict[str, Any]) -> bool:
    """Whether a ControlNet config is an ``SD3ControlNetModel``'s (a ``ControlNetModel``'s has no caption
    projection)."""
    return "caption_projection_dim" in controlnet_config


def network_class(controlnet_config: dict[str, Any]) -> type:
    """diffusers' class for a ControlNet config: ``SD3ControlNetModel`` or ``ControlNetModel``."""
    from diffusers import ControlNetModel, SD3ControlNetModel

    return SD3ControlNetModel if is_sd3_config(controlnet_config) else ControlNetModel


def controlnet_layers(transformer: nn.Module, config: ControlNetConfig) -> int:
    """The ControlNet's number of blocks: ``config.num_layers`` (checked) or its default."""
    blocks = int(transformer.config.num_layers)
    bound = blocks - 1  # the last block is context-pre-only: other keys and shapes, no residual
    if bound < 1:
        raise NotApplicableError(f"ControlNet on an SD3Transformer2DModel of {blocks} block: from_transformer copies "
                                 "the blocks before the last one, and there are none")
    if config.num_layers is None:
        return min(DEFAULT_LAYERS, bound)
    if config.num_layers > bound:
        raise ValueError(f"ControlNetConfig.num_layers: {config.num_layers}, but this transformer has {blocks} blocks; "
                         f"expected at most {bound} (its blocks less the last, context-pre-only one, which "
                         "SD3ControlNetModel.from_transformer cannot copy)")
    return config.num_layers


def transformer_view(transformer: nn.Module, force_zeros: bool) -> Any:
    """What ``SD3ControlNetModel.from_transformer`` reads of a transformer: a copy of its config (diffusers writes
    ``num_layers`` into the config it is given) and its parts' state dicts, with the base weights even where adapters
    already wrap layers of those parts."""
    from diffusers.configuration_utils import FrozenDict

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config["force_zeros_for_pooled_projection"] = force_zeros
    return SimpleNamespace(config=FrozenDict(config), **{p: PlainPart(getattr(transformer, p)) for p in PARTS})


def build(transformer: nn.Module, controlnet_config: dict[str, Any], load_weights: bool = True) -> nn.Module:
    """``SD3ControlNetModel.from_transformer`` for the config's ``num_layers`` / ``extra_conditioning_channels`` /
    ``force_zeros_for_pooled_projection``."""
    from diffusers import SD3ControlNetModel

    view = transformer_view(transformer, bool(controlnet_config["force_zeros_for_pooled_projection"]))
    return SD3ControlNetModel.from_transformer(
        view, num_layers=int(controlnet_config["num_layers"]),
        num_extra_conditioning_channels=int(controlnet_config["extra_conditioning_channels"]),
        load_weights_from_transformer=load_weights)


def derived_config(transformer: nn.Module, config: ControlNetConfig) -> Any:
    """The ``SD3ControlNetModel`` config ``from_transformer`` gives for ``transformer`` and ``config`` (built on the
    meta device)."""
    wanted = {"num_layers": controlnet_layers(transformer, config),
              "extra_conditioning_channels": config.extra_conditioning_channels,
              "force_zeros_for_pooled_projection": config.force_zeros_for_pooled_projection}
    with torch.device("meta"):
        return build(transformer, wanted, load_weights=False).config


def unreached(net: nn.Module) -> set[str]:
    """Names (``net.named_parameters()``) of the parameters the residuals do not depend on: the last block's text
    stream after the joint attention (its text queries, attention output, feed-forward: only its image tokens are
    read), and the pooled-text projection's weight when it reads zeros."""
    last = f"transformer_blocks.{len(net.transformer_blocks) - 1}."
    text_side = tuple(last + part for part in ("attn.add_q_proj.", "attn.norm_added_q.", "attn.to_add_out.",
                                               "ff_context.", "norm2_context."))
    names = {n for n, _ in net.named_parameters() if n.startswith(text_side)}
    if net.config.force_zeros_for_pooled_projection:
        names.add("time_text_embed.text_embedder.linear_1.weight")
    return names


def residuals(net: nn.Module, call: dict[str, Any], cond: Tensor, scale: float) -> dict[str, Any]:
    """The transformer's ``block_controlnet_hidden_states`` from ``net`` on the call's own arguments, as
    ``StableDiffusion3ControlNetPipeline`` calls the ControlNet."""
    hidden = call["hidden_states"]
    dtype = next(net.parameters()).dtype
    pooled, text = call.get("pooled_projections"), call.get("encoder_hidden_states")
    if pooled is not None and net.config.force_zeros_for_pooled_projection:
        pooled = torch.zeros_like(pooled)
    (blocks,) = net(hidden_states=hidden.to(dtype), controlnet_cond=cond, conditioning_scale=scale,
                    encoder_hidden_states=None if text is None else text.to(dtype),
                    pooled_projections=None if pooled is None else pooled.to(dtype), timestep=call.get("timestep"),
                    joint_attention_kwargs=call.get("joint_attention_kwargs"), return_dict=False)
    return {"block_controlnet_hidden_states": [b.to(hidden.dtype) for b in blocks]}
