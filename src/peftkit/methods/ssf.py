"""SSF (Lian et al. 2022, arXiv 2210.08823): scaling and shifting your features.

After each targeted operation the output is scaled and shifted per channel,

    y = gamma ⊙ op(x) + beta,      gamma, beta in R^{d_out}

with ``gamma = 1`` and ``beta = 0`` at the start (the model starts at the base). Only ``gamma`` and
``beta`` train: 2 d_out parameters per target. The paper inserts SSF after every operation of a ViT block
(the attention and MLP linear layers and the LayerNorms) and, being linear in ``op(x)``, re-parameterizes
it into the preceding layer for inference: ``W' = diag(gamma) W``, ``b' = gamma ⊙ b + beta`` (for a
LayerNorm its affine weight and bias). Merging into a layer without a bias adds one (unmerge removes it;
``merge_and_unload`` keeps it, so the merged model then has biases its config does not declare).

Default targets: the attention and MLP projections of the architecture (query, key, value, attention
output, FFN gate / in / out) plus every ``nn.LayerNorm``, as in the paper. Supported layers: Linear, GPT-2
Conv1D, Conv2d (per output channel) and LayerNorm. Not in Hugging Face PEFT; the checkpoint keys are
``ssf_scale`` and ``ssf_shift``, shape (d_out,).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import ConfigError, PeftConfig
from ..layers import Adapter
from ..kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ..registry import register_method
from ..targeting import model_family, role_names


@dataclasses.dataclass
class SSFConfig(PeftConfig):
    """SSF configuration.

    Args:
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's attention and MLP projections plus every LayerNorm (written into the config
            on injection, so a saved adapter names its targets).
        exclude_modules: names or regex never to target.
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        init_weights: True starts at the identity (gamma = 1, beta = 0); False draws gamma ~ N(1, 0.02) and
            beta ~ N(0, 0.02), the initialisation of the paper's code.
    """

    PEFT_TYPE: ClassVar[str] = "SSF"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(isinstance(self.init_weights, bool), "init_weights", "True or False")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError(
                "SSFConfig.layers_to_transform / layers_pattern: cannot be used when target_modules is a regex "
                "string; put the layer filter into the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("SSFConfig.layers_pattern: only meaningful together with layers_to_transform")


# -- weight math (pure functions) --------------------------------------------------------------------------
def channel_shape(weight_or_out: Tensor, axis: int) -> list[int]:
    """Broadcast shape that puts a (d,) vector on ``axis`` of a tensor (negative: counted from the end)."""
    shape = [1] * weight_or_out.dim()
    shape[axis] = -1
    return shape


def ssf_apply(out: Tensor, scale: Tensor, shift: Tensor, axis: int = -1) -> Tensor:
    """``scale ⊙ out + shift`` with the channels of ``out`` on ``axis``."""
    shape = channel_shape(out, axis)
    return out * scale.reshape(shape) + shift.reshape(shape)


def ssf_merge_weight(weight: Tensor, scale: Tensor, axis: int) -> Tensor:
    """Re-parameterized weight ``diag(scale) W``: ``W`` scaled along its output-channel ``axis``."""
    return weight * scale.reshape(channel_shape(weight, axis))


def ssf_merge_bias(bias: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Re-parameterized bias ``scale ⊙ b + shift`` (channels on the last axis)."""
    return bias * scale + shift


def _divide(value: Tensor, scale: Tensor) -> Tensor:
    # entries scaled by 0 cannot be recovered by division; the wrapper's exact-restore record fills them
    return torch.where(scale == 0, torch.zeros_like(value), value / scale)


def _kind(base: nn.Module) -> str:
    if isinstance(base, nn.LayerNorm):
        return "norm"
    if isinstance(base, nn.Conv2d):
        return "conv"
    return "conv1d" if is_transposed(base) else "linear"


def _channels(base: nn.Module) -> int:
    kind = _kind(base)
    if kind == "norm":
        return base.normalized_shape[-1]
    if kind == "conv":
        return base.out_channels
    return layer_dims(base)[0]  # d_out (a quantized Linear's packed weight has another shape)


def layer_norm_names(named: list[tuple[str, nn.Module]]) -> list[str]:
    """The shortest dotted suffix of each LayerNorm's path that names only LayerNorms (e.g. ``"ln_1"``, or
    ``"transformer_blocks.0.norm1"`` where ``"norm1"`` is also a GroupNorm), deduplicated, in model order."""
    paths = [(p, isinstance(m, nn.LayerNorm)) for p, m in named if p]
    names: list[str] = []
    for path, is_norm in paths:
        if not is_norm:
            continue
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(ok for p, ok in paths if p == suffix or p.endswith("." + suffix)):
                break
        if suffix not in names:
            names.append(suffix)
    return names


@register_method(
    "ssf",
    config=SSFConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="2 d_out per target (scale and shift)",
    position="per-channel scale and shift after each targeted op (linear, conv, LayerNorm)",
    paper="arXiv 2210.08823 (SSF)",
    examples={"ssf": {}},
)
class SSFAdapter(Adapter):
    supported_layers = (nn.Linear, nn.Conv2d, nn.LayerNorm) + CONV1D_TYPES
    default_roles = ("query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out")
    checkpoint_keys: ClassVar[dict[str, str]] = {"ssf_scale": "ssf_scale", "ssf_shift": "ssf_shift"}
    merged_params = ("weight", "bias")

    def __init__(self, base: nn.Module, config: SSFConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.kind = _kind(base)
        d = _channels(base)
        # channel axis of the op's output, and of its weight: Linear (out, in), Conv1D (in, out),
        # Conv2d (out, in / groups, kh, kw), LayerNorm affine (..., d)
        self.out_axis = -3 if self.kind == "conv" else -1  # (N, C, H, W) or unbatched (C, H, W)
        self.weight_axis = {"linear": 0, "conv": 0, "conv1d": 1, "norm": -1}[self.kind]
        w = getattr(base, "weight", None)
        device = w.device if w is not None else None
        dtype = adapter_dtype(w)  # fp32 on half-precision / quantized bases and without a weight
        self.ssf_scale = nn.Parameter(torch.ones(d, device=device, dtype=dtype))  # gamma (d_out,)
        self.ssf_shift = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))  # beta (d_out,)
        if init and not config.init_weights:
            with torch.no_grad():
                self.ssf_scale.copy_(torch.randn(d) * 0.02 + 1.0)
                self.ssf_shift.copy_(torch.randn(d) * 0.02)

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: SSFConfig) -> None:
        """``target_modules=None`` becomes the projections of the role table plus every LayerNorm."""
        if config.target_modules is None and model_family(model) is not None:
            config.target_modules = role_names(model, named, cls.default_roles) + layer_norm_names(named)

    @classmethod
    def param_count(cls, base: nn.Module, config: SSFConfig, key: str = "") -> int:
        """Closed form: 2 d_out per target."""
        return 2 * _channels(base)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        scale = self.ssf_scale
        return ssf_apply(out.to(scale.dtype), scale, self.ssf_shift, self.out_axis).to(out.dtype)

    # -- merge into the preceding layer --------------------------------------------------------------------
    def _vector(self, p: Tensor, like: Tensor) -> Tensor:
        return p.to(like.device, like.dtype)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        return ssf_merge_weight(weight, self._vector(self.ssf_scale, weight), self.weight_axis), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        scale = self._vector(self.ssf_scale, weight).reshape(channel_shape(weight, self.weight_axis))
        return _divide(weight, scale)

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return ssf_merge_bias(value, self._vector(self.ssf_scale, value), self._vector(self.ssf_shift, value))

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        scale = self._vector(self.ssf_scale, value)
        return _divide(value - self._vector(self.ssf_shift, value), scale)

    def missing_param(self, base: nn.Module, name: str) -> Tensor | None:
        """A bias-free layer gets a zero bias (the shift needs one); a LayerNorm without affine parameters
        also gets a unit weight."""
        if name == "weight" and self.kind != "norm":
            return None
        w = getattr(base, "weight", None)
        like = w if w is not None else self.ssf_scale
        shape = tuple(base.normalized_shape) if self.kind == "norm" else (_channels(base),)
        fill = 1.0 if name == "weight" else 0.0
        return torch.full(shape, fill, device=like.device, dtype=like.dtype)
