"""ControlNet (Zhang et al. 2023, arXiv 2302.05543; the survey's additive side networks) on a diffusers
``UNet2DConditionModel``.

A trainable copy of the frozen UNet's encoder (input conv, time embedding, down blocks, mid block) reads the noisy
sample, the timestep, the text and a conditioning image (through a small convolutional encoder added to its input);
one zero-initialised 1x1 convolution per skip connection, and one on the mid block, turn its states into residuals
that are added to the frozen UNet's skip connections and mid-block output:

    c_f = E(c)  (E: conditioning encoder, last conv zero);   h_0 = conv_in(z_t) + c_f
    d_i = Z_i(copy of the encoder's state i),  m = Z_mid(copy of the mid block's output)   (Z: zero 1x1 convs)
    eps = UNet(z_t, t, text; skip_i += s d_i, mid += s m)                                   (s: conditioning_scale)

All of it is diffusers' own: the network is a ``ControlNetModel`` built by ``ControlNetModel.from_unet`` (weights
copied from the UNet, zero convs zero), its residuals go in as the UNet's ``down_block_additional_residuals`` /
``mid_block_additional_residual``. The zero convs make the adapted UNet equal the base at the start. Trainable:
the ``ControlNetModel``'s parameters (the encoder copy, the conditioning encoder, the zero convs).

The image: ``model(sample, t, encoder_hidden_states=..., controlnet_cond=image)``, image ``(batch,
conditioning_channels, H f, W f)`` for a sample ``(batch, C, H, W)``, ``f = 2 ** (len(conditioning_embedding_out_
channels) - 1)``; values as diffusers' pipelines pass them ([0, 1]). Checked before anything runs (``side.py``).

Files: ``PeftModel.save_pretrained`` writes the network's tensors under ``base_model.model.controlnet.<diffusers
key>``; ``save_controlnet`` writes diffusers' own ``ControlNetModel`` folder (``ControlNetModel.from_pretrained``
loads it) and ``load_controlnet`` adds such a folder to a UNet as a peftkit adapter. Not mergeable; per-row
routing (``adapter_names``) is refused.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype
from ...registry import register_method
from .config import ControlNetConfig
from .side import HOST, SideNetAdapter, plain_unet_view, require_unet, to_place


def jsonable(config: Any) -> dict[str, Any]:
    """A diffusers config without its private keys, as JSON would give it back (tuples -> lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def controlnet_kwargs(config: ControlNetConfig) -> dict[str, Any]:
    """The arguments of ``ControlNetModel.from_unet`` that the config sets."""
    return {"controlnet_conditioning_channel_order": config.controlnet_conditioning_channel_order,
            "conditioning_embedding_out_channels": tuple(config.conditioning_embedding_out_channels),
            "conditioning_channels": config.conditioning_channels}


def derived_config(unet: nn.Module, config: ControlNetConfig) -> dict[str, Any]:
    """The ``ControlNetModel`` config ``from_unet`` gives for ``unet`` and ``config`` (built on the meta device)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        net = ControlNetModel.from_unet(plain_unet_view(unet), load_weights_from_unet=False,
                                        **controlnet_kwargs(config))
    return jsonable(net.config)


@register_method(
    "controlnet", config=ControlNetConfig, category="additive", modalities=("generation",), mergeable=False,
    param_formula="a trainable copy of the UNet's encoder (conv_in, time embedding, down blocks, mid block) + the "
                  "conditioning encoder + one zero 1x1 conv per skip connection and one on the mid block",
    position="a side network beside the frozen UNet: its residuals join the skip connections and the mid block",
    changes_structure=True, starts_at_base=True, paper="arXiv 2302.05543 (Zhang et al. 2023), ControlNet",
    examples={"controlnet": {"conditioning_embedding_out_channels": [8, 16], "blank_condition": 0.5}},
)
class ControlNetAdapter(SideNetAdapter):
    cond_argument: ClassVar[str] = "controlnet_cond"
    label: ClassVar[str] = "ControlNet"
    file_prefix: ClassVar[str] = "controlnet"

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ControlNetConfig) -> None:
        derived = derived_config(require_unet(model, cls.label), config)
        given = config.controlnet_config
        if given is not None:
            given = jsonable(given)
            diff = sorted(k for k in set(given) | set(derived) if given.get(k) != derived.get(k))
            if diff:
                k = diff[0]
                raise ValueError(f"ControlNetConfig.controlnet_config: {k} is {given.get(k)!r}, but this UNet and "
                                 f"the config's fields give {derived.get(k)!r} (the ControlNet was made for another "
                                 "UNet or other conditioning fields)")
        config.controlnet_config = derived

    @classmethod
    def param_count(cls, base: nn.Module, config: ControlNetConfig, key: str = "") -> int:
        from diffusers import ControlNetModel

        with torch.device("meta"):
            return sum(p.numel() for p in ControlNetModel.from_config(config.controlnet_config).parameters())

    def __init__(self, base: nn.Module, config: ControlNetConfig, key: str = "", init: bool = True) -> None:
        from diffusers import ControlNetModel

        super().__init__()
        self.key = key
        self.cond_channels, self.factor = config.conditioning_channels, config.downscale
        self.scale, self.blank = float(config.conditioning_scale), config.blank_condition
        self.kwargs = controlnet_kwargs(config)
        self.load_device, self.dtype = base.weight.device, adapter_dtype(base)
        # init: a placeholder on the meta device until after_inject builds the network from the UNet (from_unet)
        self.pending = init
        with torch.device("meta" if init else self.load_device):
            self.net = ControlNetModel.from_config(config.controlnet_config)
        if not init:
            self.net = to_place(self.net, self.load_device, self.dtype)

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """A new adapter's network: ``ControlNetModel.from_unet`` (the encoder's weights copied, zero convs zero)."""
        from diffusers import ControlNetModel

        adapter = getattr(model, HOST).adapters[adapter_name]
        if isinstance(adapter, ControlNetAdapter) and adapter.pending:
            net = ControlNetModel.from_unet(plain_unet_view(model), load_weights_from_unet=True, **adapter.kwargs)
            adapter.net = to_place(net, adapter.load_device, adapter.dtype)
            adapter.pending = False

    def residuals(self, call: dict[str, Any], cond: Tensor) -> dict[str, Any]:
        sample = call["sample"]
        dtype = next(self.net.parameters()).dtype
        ehs = call.get("encoder_hidden_states")
        down, mid = self.net(
            sample.to(dtype), call["timestep"], encoder_hidden_states=None if ehs is None else ehs.to(dtype),
            controlnet_cond=cond, conditioning_scale=self.scale, class_labels=call.get("class_labels"),
            timestep_cond=call.get("timestep_cond"), attention_mask=call.get("attention_mask"),
            added_cond_kwargs=call.get("added_cond_kwargs"), cross_attention_kwargs=call.get("cross_attention_kwargs"),
            return_dict=False)
        return {"down_block_additional_residuals": tuple(d.to(sample.dtype) for d in down),
                "mid_block_additional_residual": mid.to(sample.dtype)}
