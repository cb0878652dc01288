"""IPAdapterConfig: the image prompt's width and token count, the scale of the image branch; validated when built."""

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
    """

    PEFT_TYPE: ClassVar[str] = "IP_ADAPTER"

    image_embed_dim: int = 1024
    num_tokens: int = 4
    scale: float = 1.0
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "image_embed_dim", 1)
        check_int(self, "num_tokens", 1)
        check_number(self, "scale")
        check_bool(self, "init_weights")
