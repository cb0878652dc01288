"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453; the survey's additive side networks) on a diffusers
``UNet2DConditionModel``.

A small convolutional encoder reads the conditioning image alone (no sample, no timestep, no text) and gives one
feature map per down block of the frozen UNet, each of the block's width and resolution; the UNet adds them inside
its down blocks:

    F_c = T(c)  (pixel-unshuffle by f, conv, then per level: [avg-pool 2,] [1x1 conv,] residual blocks)
    eps = UNet(z_t, t, text; down block i's state += s F_c[i])          (s: conditioning_scale)

All of it is diffusers' own: the network is a ``T2IAdapter`` (``full_adapter``) with ``channels`` = the UNet's
``block_out_channels``, its features go in as the UNet's ``down_intrablock_additional_residuals`` (as
``StableDiffusionAdapterPipeline`` passes them). Unlike ControlNet it has no zero initialisation (the paper's
adapter acts from the start). Trainable: the ``T2IAdapter``'s parameters.

Fit. Feature i has ``channels[i]`` channels at ``1 / 2**i`` of the sample's size; the UNet adds it in down block i
at that size when the block has cross-attention (before its downsampler) or is the last block, but after the
downsampler in a plain ``DownBlock2D`` that is not last, where the sizes differ: such UNets are refused when the
adapter is added, naming the block.

The image: ``model(sample, t, encoder_hidden_states=..., adapter_cond=image)``, image ``(batch,
conditioning_channels, H f, W f)`` for a sample ``(batch, C, H, W)``, ``f = downscale_factor``; checked before
anything runs (``controlnet/side.py``). Files: ``PeftModel.save_pretrained`` writes the network under
``base_model.model.t2i_adapter.<diffusers key>``; ``save_t2i_adapter`` / ``load_t2i_adapter`` write / read diffusers'
``T2IAdapter`` folder. Not mergeable; per-row routing (``adapter_names``) is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype
from ...registry import register_method
from ..controlnet.side import SideNetAdapter, require_unet, to_place
from .config import T2IAdapterConfig


def check_fit(unet: nn.Module, config: T2IAdapterConfig) -> list[int]:
    """The feature widths (the UNet's ``block_out_channels``), after checking the adapter's features fit the UNet."""
    cfg = unet.config
    widths = [int(c) for c in cfg.block_out_channels]
    if config.channels is not None and list(config.channels) != widths:
        raise ValueError(f"T2IAdapterConfig.channels: {config.channels}, but the UNet's down blocks are {widths} wide; "
                         "expected None or the UNet's block_out_channels")
    types = list(cfg.down_block_types)
    for i, kind in enumerate(types[:-1]):
        if "CrossAttn" not in kind:
            raise ValueError(f"T2I-Adapter on this UNet: down block {i} ({kind}) takes its feature after downsampling, "
                             f"at half the size of the adapter's level {i}; expected cross-attention blocks before "
                             f"the last one (down_block_types {types})")
    return widths


@register_method(
    "t2i_adapter", config=T2IAdapterConfig, category="additive", modalities=("generation",), mergeable=False,
    param_formula="conv_in (c f^2 -> w_0, 3x3) + per level i: [1x1 w_{i-1} -> w_i,] n residual blocks (3x3 + 1x1 "
                  "convs of width w_i); w_i: the UNet's block widths",
    position="a conditioning-image encoder beside the frozen UNet: its features join the UNet's down blocks",
    changes_structure=True, starts_at_base=False, paper="arXiv 2302.08453 (Mou et al. 2023), T2I-Adapter",
    examples={"t2i_adapter": {"num_res_blocks": 1, "downscale_factor": 2, "blank_condition": 0.5}},
)
class T2IAdapterAdapter(SideNetAdapter):
    cond_argument: ClassVar[str] = "adapter_cond"
    label: ClassVar[str] = "T2I-Adapter"
    file_prefix: ClassVar[str] = "t2i_adapter"

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: T2IAdapterConfig) -> None:
        config.channels = check_fit(require_unet(model, cls.label), config)

    @classmethod
    def param_count(cls, base: nn.Module, config: T2IAdapterConfig, key: str = "") -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in _network(config).parameters())

    def __init__(self, base: nn.Module, config: T2IAdapterConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.key = key
        self.cond_channels, self.factor = config.conditioning_channels, config.downscale_factor
        self.scale, self.blank = float(config.conditioning_scale), config.blank_condition
        self.net = to_place(_network(config), base.weight.device, adapter_dtype(base))

    def residuals(self, call: dict[str, Any], cond: Tensor) -> dict[str, Any]:
        dtype = call["sample"].dtype
        return {"down_intrablock_additional_residuals": [f.to(dtype) * self.scale for f in self.net(cond)]}


def _network(config: T2IAdapterConfig) -> nn.Module:
    from diffusers import T2IAdapter

    return T2IAdapter(in_channels=config.conditioning_channels, channels=list(config.channels),
                      num_res_blocks=config.num_res_blocks, downscale_factor=config.downscale_factor,
                      adapter_type="full_adapter")
