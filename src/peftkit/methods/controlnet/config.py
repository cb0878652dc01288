"""ControlNetConfig: the conditioning image's channels and embedding (UNet), the copied blocks and the conditioning
latent's extra channels (SD3 transformer), the residual scale, validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...config import PeftConfig, check_bool, check_int, check_number, is_int


@dataclasses.dataclass
class ControlNetConfig(PeftConfig):
    """ControlNet (Zhang et al. 2023, arXiv 2302.05543) on a diffusers ``UNet2DConditionModel`` (diffusers'
    ``ControlNetModel``) or ``SD3Transformer2DModel`` (diffusers' ``SD3ControlNetModel``). The first three fields
    shape the UNet's ControlNet and are ignored on an SD3 transformer; ``num_layers``,
    ``extra_conditioning_channels`` and ``force_zeros_for_pooled_projection`` are the SD3 ControlNet's and must keep
    their defaults on a UNet.

    Args:
        conditioning_channels: channels of the conditioning image (3: RGB; 1: an edge map).
        conditioning_embedding_out_channels: widths of the conditioning image's encoder (diffusers'
            ``ControlNetConditioningEmbedding``); each step after the first halves the resolution, so the image is
            ``2 ** (len - 1)`` times the UNet sample's size (the default: 8, Stable Diffusion's latent factor).
        controlnet_conditioning_channel_order: ``"rgb"`` or ``"bgr"`` (the image's channels are flipped for bgr).
        conditioning_scale: the factor on every residual (diffusers' ``controlnet_conditioning_scale``).
        blank_condition: a call without ``controlnet_cond`` uses a constant image of this value; None (the default):
            the image is required.
        num_layers: SD3 only: the ``SD3ControlNetModel``'s joint transformer blocks, copies of the transformer's
            first ``num_layers`` blocks (at most the transformer's blocks less its last, a context-pre-only block
            diffusers cannot copy); their residuals are spread over the transformer's blocks as diffusers does.
            None (the default): diffusers' ``from_transformer`` default, 12, or that bound when it is smaller.
        extra_conditioning_channels: SD3 only: channels of the conditioning latent beyond the transformer's
            ``in_channels`` (diffusers' ``num_extra_conditioning_channels``: 1 for an inpainting mask); the latent
            is ``(batch, in_channels + extra_conditioning_channels, H, W)`` for ``hidden_states`` ``(batch,
            in_channels, H, W)``.
        force_zeros_for_pooled_projection: SD3 only: the ControlNet reads zeros in place of the call's
            ``pooled_projections`` (the ``SD3ControlNetModel`` config key of that name, which diffusers'
            ``StableDiffusion3ControlNetPipeline`` honours the same way; its default, True).
        controlnet_config: the ``ControlNetModel``'s config (``ControlNetModel.from_unet``'s, without diffusers'
            private keys; on an SD3 transformer the ``SD3ControlNetModel``'s, ``from_transformer``'s); filled in
            from the base model and the fields above when the adapter is added, and checked against them when it
            is loaded.
    """

    PEFT_TYPE: ClassVar[str] = "CONTROLNET"

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 96, 256])
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_scale: float = 1.0
    blank_condition: float | None = None
    num_layers: int | None = None
    extra_conditioning_channels: int = 0
    force_zeros_for_pooled_projection: bool = True
    controlnet_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "conditioning_channels", 1)
        widths = self.conditioning_embedding_out_channels
        if isinstance(widths, tuple):
            self.conditioning_embedding_out_channels = widths = list(widths)
        self._check(isinstance(widths, list) and len(widths) > 0 and all(is_int(w) and w > 0 for w in widths),
                    "conditioning_embedding_out_channels", "a non-empty list of integers > 0")
        self._check(self.controlnet_conditioning_channel_order in ("rgb", "bgr"),
                    "controlnet_conditioning_channel_order", "'rgb' or 'bgr'")
        check_number(self, "conditioning_scale")
        if self.blank_condition is not None:
            check_number(self, "blank_condition")
        check_int(self, "num_layers", 1, optional=True, expected="None or an integer > 0")
        check_int(self, "extra_conditioning_channels", 0)
        check_bool(self, "force_zeros_for_pooled_projection")
        self._check(self.controlnet_config is None or isinstance(self.controlnet_config, dict), "controlnet_config",
                    "None or a dict (ControlNetModel's config)")

    @property
    def downscale(self) -> int:
        """Conditioning-image pixels per UNet sample pixel, along each side."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)
