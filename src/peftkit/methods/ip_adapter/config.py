"""IPAdapterConfig: the image prompt's width and token count, the scale of the image branch, the SD3 resampler's sizes;
validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_bool, check_int, check_number


@dataclasses.dataclass
class IPAdapterConfig(PeftConfig):
    """IP-Adapter (Ye et al. 2023, arXiv 2308.06721): an image prompt read by decoupled cross-attention.

    Args:
        image_embed_dim: width of the image encoder's embedding (the image prompt): a CLIP vision model's
            ``projection_dim`` (``image_embeds`` of ``CLIPVisionModelWithProjection``; ViT-H/14: 1024).
        num_tokens: N, the image tokens the projection makes of one image embedding (the paper's 4; diffusers'
            ``load_ip_adapter`` reads files of 4 tokens only).
        scale: lambda, the weight of the image branch: ``attn(q, K_text, V_text) + lambda attn(q, K_ip, V_ip)``;
            0 gives the base model. ``set_ip_adapter_scale`` changes it on a built model.
        target_modules: the cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``) that get
            the image keys and values, by name / dotted suffix or a full-match regex; None: every one of them
            (a UNet's ``attn2``), as the paper and diffusers' loader do.
        init_weights: True: ``to_k_ip`` / ``to_v_ip`` start as copies of the layer's ``to_k`` / ``to_v`` (the
            paper's initialisation); False: PyTorch's default ``nn.Linear`` initialisation.

    On SD3's transformer (``SD3Transformer2DModel``, ``sd3.py``) the image prompt is a sequence of image-encoder
    features ``(B, L, image_embed_dim)`` (SigLIP's penultimate hidden states: 1152 wide), ``num_tokens`` is the
    resampler's query count (InstantX's SD3.5 IP-Adapter: 64), ``target_modules`` selects among the joint attentions
    (None: all of them), and the projection is diffusers' ``IPAdapterTimeImageProjection``, a timestep-conditioned
    perceiver resampler of attention heads 64 wide, sized by the four fields below (unused on a UNet; the defaults
    are the SD3.5-Large IP-Adapter's):

        resampler_dim: the resampler's width (``hidden_dim``; also the width of the timestep embedding each joint
            attention's ``norm_ip`` reads): 1280.
        resampler_depth: its blocks (``depth``): 4, the only depth diffusers' SD3 ``load_ip_adapter`` builds.
        resampler_heads: its attention heads, each 64 wide (``heads``): 20.
        timestep_in_dim: the sinusoidal timestep features it embeds (``timestep_in_dim``): 320.
    """

    PEFT_TYPE: ClassVar[str] = "IP_ADAPTER"

    image_embed_dim: int = 1024
    num_tokens: int = 4
    scale: float = 1.0
    target_modules: list[str] | str | None = None
    init_weights: bool = True
    resampler_dim: int = 1280
    resampler_depth: int = 4
    resampler_heads: int = 20
    timestep_in_dim: int = 320

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "image_embed_dim", 1)
        check_int(self, "num_tokens", 1)
        check_number(self, "scale")
        check_bool(self, "init_weights")
        for field in ("resampler_dim", "resampler_depth", "resampler_heads"):
            check_int(self, field, 1)
        check_int(self, "timestep_in_dim", 2)
