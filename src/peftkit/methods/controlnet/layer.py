"""ControlNet (Zhang et al. 2023, arXiv 2302.05543; the survey's additive side networks) on a diffusers
``UNet2DConditionModel`` (below) or ``SD3Transformer2DModel`` (diffusers' ``SD3ControlNetModel``: ``sd3.py``); one
registered method, the backbone read from the model (and, for a built adapter, from its ``controlnet_config``).

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
loads it; an ``SD3ControlNetModel`` one on SD3) and ``load_controlnet`` adds such a folder to a UNet (SD3
transformer) as a peftkit adapter. Not mergeable; per-row routing (``adapter_names``) is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype
from ...registry import register_method
from . import sd3
from .config import ControlNetConfig
from .side import SideNetAdapter, backbone_of, host_name, jsonable, plain_unet_view, to_place

SD3 = "SD3Transformer2DModel"
# the SD3 ControlNet's fields, with the values a UNet's ControlNet needs
SD3_FIELDS = {"num_layers": None, "extra_conditioning_channels": 0, "force_zeros_for_pooled_projection": True}


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


def check_unet_fields(config: ControlNetConfig) -> None:
    """The SD3-only fields keep their defaults on a UNet."""
    for field, default in SD3_FIELDS.items():
        if getattr(config, field) != default:
            raise ConfigError(f"ControlNetConfig.{field}: a field of the ControlNet on an SD3Transformer2DModel; "
                              f"expected {default!r} on a UNet, got {getattr(config, field)!r}")


@register_method(
    "controlnet", config=ControlNetConfig, category="additive", modalities=("generation",), mergeable=False,
    param_formula="a trainable copy of the UNet's encoder (conv_in, time embedding, down blocks, mid block) + the "
                  "conditioning encoder + one zero 1x1 conv per skip connection and one on the mid block; on SD3: "
                  "a copy of the embeddings and the first n joint blocks + one zero Linear per block + a zero "
                  "patch embedding of the conditioning latent",
    position="a side network beside the frozen UNet (SD3 transformer): its residuals join the skip connections and "
             "the mid block (the blocks' image tokens)",
    changes_structure=True, starts_at_base=True, paper="arXiv 2302.05543 (Zhang et al. 2023), ControlNet",
    examples={"controlnet": {"conditioning_embedding_out_channels": [8, 16], "blank_condition": 0.5}},
)
class ControlNetAdapter(SideNetAdapter):
    cond_argument: ClassVar[str] = "controlnet_cond"
    label: ClassVar[str] = "ControlNet"
    file_prefix: ClassVar[str] = "controlnet"
    backbones: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel", SD3)
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Conv2d, nn.Linear)  # the UNet's conv_out, SD3's proj_out

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ControlNetConfig) -> None:
        if backbone_of(cls.require_backbone(model)) == SD3:
            derived, kind = jsonable(sd3.derived_config(model, config)), "transformer"
        else:
            check_unet_fields(config)
            derived, kind = derived_config(model, config), "UNet"
        given = config.controlnet_config
        if given is not None:
            given = jsonable(given)
            diff = sorted(k for k in set(given) | set(derived) if given.get(k) != derived.get(k))
            if diff:
                k = diff[0]
                raise ValueError(f"ControlNetConfig.controlnet_config: {k} is {given.get(k)!r}, but this {kind} and "
                                 f"the config's fields give {derived.get(k)!r} (the ControlNet was made for another "
                                 f"{kind} or other conditioning fields)")
        config.controlnet_config = derived

    @classmethod
    def unreached_params(cls, model: nn.Module) -> set[str]:
        """On SD3: the parameters of each ControlNet that its residuals do not depend on (``sd3.unreached``)."""
        return {f"{path}.net.{name}" for path, adapter in model.named_modules()
                if isinstance(adapter, ControlNetAdapter) and adapter.sd3 for name in sd3.unreached(adapter.net)}

    @classmethod
    def param_count(cls, base: nn.Module, config: ControlNetConfig, key: str = "") -> int:
        with torch.device("meta"):
            net = sd3.network_class(config.controlnet_config).from_config(config.controlnet_config)
            return sum(p.numel() for p in net.parameters())

    def __init__(self, base: nn.Module, config: ControlNetConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.key = key
        cfg = self.net_config = config.controlnet_config
        self.sd3 = sd3.is_sd3_config(cfg)
        if self.sd3:  # a latent of the sample's size: its channels and the extra ones
            self.cond_channels, self.factor = int(cfg["in_channels"]) + int(cfg["extra_conditioning_channels"]), 1
        else:
            self.cond_channels, self.factor = config.conditioning_channels, config.downscale
        self.scale, self.blank = float(config.conditioning_scale), config.blank_condition
        self.kwargs = controlnet_kwargs(config)
        self.load_device, self.dtype = base.weight.device, adapter_dtype(base)
        # init: a placeholder on the meta device until after_inject builds the network from the base model
        # (from_unet / from_transformer)
        self.pending = init
        with torch.device("meta" if init else self.load_device):
            self.net = sd3.network_class(cfg).from_config(cfg)
        if not init:
            self.net = to_place(self.net, self.load_device, self.dtype)

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """A new adapter's network: ``ControlNetModel.from_unet`` (the encoder's weights copied, zero convs zero) or
        ``SD3ControlNetModel.from_transformer`` (the embeddings and first blocks copied, the zero parts zero)."""
        from diffusers import ControlNetModel

        adapter = getattr(model, host_name(model)).adapters[adapter_name]
        if isinstance(adapter, ControlNetAdapter) and adapter.pending:
            if adapter.sd3:
                net = sd3.build(model, adapter.net_config)
            else:
                net = ControlNetModel.from_unet(plain_unet_view(model), load_weights_from_unet=True, **adapter.kwargs)
            adapter.net = to_place(net, adapter.load_device, adapter.dtype)
            adapter.pending = False

    def residuals(self, call: dict[str, Any], cond: Tensor) -> dict[str, Any]:
        if self.sd3:
            return sd3.residuals(self.net, call, cond, self.scale)
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
