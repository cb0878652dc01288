"""ControlNetConfig: the conditioning image's channels and embedding, the residual scale, validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...config import PeftConfig, check_int, check_number, is_int


@dataclasses.dataclass
class ControlNetConfig(PeftConfig):
    """ControlNet (Zhang et al. 2023, arXiv 2302.05543) on a diffusers ``UNet2DConditionModel``.

    Args:
        conditioning_channels: channels of the conditioning image (3: RGB; 1: an edge map).
        conditioning_embedding_out_channels: widths of the conditioning image's encoder (diffusers'
            ``ControlNetConditioningEmbedding``); each step after the first halves the resolution, so the image is
            ``2 ** (len - 1)`` times the UNet sample's size (the default: 8, Stable Diffusion's latent factor).
        controlnet_conditioning_channel_order: ``"rgb"`` or ``"bgr"`` (the image's channels are flipped for bgr).
        conditioning_scale: the factor on every residual (diffusers' ``controlnet_conditioning_scale``).
        blank_condition: a call without ``controlnet_cond`` uses a constant image of this value; None (the default):
            the image is required.
        controlnet_config: the ``ControlNetModel``'s config (``ControlNetModel.from_unet``'s, without diffusers'
            private keys); filled in from the UNet and the fields above when the adapter is added, and checked
            against them when it is loaded.
    """

    PEFT_TYPE: ClassVar[str] = "CONTROLNET"

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 96, 256])
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_scale: float = 1.0
    blank_condition: float | None = None
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
        self._check(self.controlnet_config is None or isinstance(self.controlnet_config, dict), "controlnet_config",
                    "None or a dict (ControlNetModel's config)")

    @property
    def downscale(self) -> int:
        """Conditioning-image pixels per UNet sample pixel, along each side."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)
