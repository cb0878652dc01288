"""T2IAdapterConfig: the conditioning image's channels and scale, the encoder's depth, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import PeftConfig, check_int, check_number, is_int


@dataclasses.dataclass
class T2IAdapterConfig(PeftConfig):
    """T2I-Adapter (Mou et al. 2023, arXiv 2302.08453) on a diffusers ``UNet2DConditionModel``.

    Args:
        conditioning_channels: channels of the conditioning image (diffusers' ``in_channels``; 3: RGB, 1: a sketch).
        downscale_factor: conditioning-image pixels per UNet sample pixel along each side (the adapter's first
            pixel-unshuffle; 8: Stable Diffusion's latents, 1: a pixel-space UNet).
        num_res_blocks: residual blocks per feature level.
        channels: the feature width of each level, one per down block of the UNet; None (the default): the UNet's
            ``block_out_channels`` (filled in when the adapter is added; a given value must equal them).
        conditioning_scale: the factor on every feature (diffusers' ``adapter_conditioning_scale``).
        blank_condition: a call without ``adapter_cond`` uses a constant image of this value; None (the default):
            the image is required.
    """

    PEFT_TYPE: ClassVar[str] = "T2I_ADAPTER"

    conditioning_channels: int = 3
    downscale_factor: int = 8
    num_res_blocks: int = 2
    channels: list[int] | None = None
    conditioning_scale: float = 1.0
    blank_condition: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "conditioning_channels", 1)
        check_int(self, "downscale_factor", 1)
        check_int(self, "num_res_blocks", 1)
        if isinstance(self.channels, tuple):
            self.channels = list(self.channels)
        ok = self.channels is None or (isinstance(self.channels, list) and len(self.channels) > 0
                                       and all(is_int(c) and c > 0 for c in self.channels))
        self._check(ok, "channels", "None or a non-empty list of integers > 0")
        check_number(self, "conditioning_scale")
        if self.blank_condition is not None:
            check_number(self, "blank_condition")
