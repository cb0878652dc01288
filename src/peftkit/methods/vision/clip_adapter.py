"""CLIP-Adapter (Gao et al. 2021, arXiv 2110.04544): a residual-blended bottleneck MLP on CLIP's features.

    A(f) = ReLU(W_2 ReLU(W_1 f)),   f' = alpha * A(f) + (1 - alpha) * f            (alpha = 0.2 in the paper)

f (B, D) is the projected image feature (output of ``visual_projection``, role ``image_features``) and,
optionally, the projected text feature (``text_projection``, role ``text_features``) with its own MLP.
W_1: (D / r, D), W_2: (D, D / r), no biases, r = 4; PyTorch's default Linear init, as the paper's code.
CLIP then L2-normalises f' as usual, so the plain forward, ``get_image_features`` and ``classify`` all use it.
Few-shot training: cross-entropy over ``classify`` logits (zero-shot text classifier, frozen CLIP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import PeftConfig, check_bool, check_int, check_probability
from ...kernel_helpers import adapter_dtype
from ...layers import Adapter
from ...registry import register_method
from ._roles import find_path, not_applicable


@dataclasses.dataclass
class ClipAdapterConfig(PeftConfig):
    """CLIP-Adapter configuration.

    Args:
        alpha: the residual ratio (paper: 0.2 for images; ``alpha`` = 0 is CLIP, 1 the adapter alone).
        reduction: r, the bottleneck is D / r wide (paper: 4).
        image: adapt the image feature (``visual_projection``).
        text: adapt the text feature (``text_projection``) too.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "CLIP_ADAPTER"

    alpha: float = 0.2
    reduction: int = 4
    image: bool = True
    text: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability(self, "alpha", closed=True)
        check_int(self, "reduction", 1, expected="an int >= 1")
        check_bool(self, "image", "text")
        self._check(self.image or self.text, "image", "True, or text=True (nothing to adapt otherwise)")


@register_method(
    "clip_adapter",
    config=ClipAdapterConfig,
    category="additive",
    modalities=("vision-language",),
    mergeable=False,
    param_formula="2 D^2 / r per adapted feature (D: CLIP's projection width)",
    position="bottleneck MLP blended into the projected image (and optionally text) feature",
    starts_at_base=False,
    paper="arXiv 2110.04544 (CLIP-Adapter, Gao et al. 2021)",
    examples={"clip_adapter": {"text": True}},
)
class ClipFeatureAdapter(Adapter):
    """``clip_adapter_down`` (D / r, D) and ``clip_adapter_up`` (D, D / r) on one projection's output."""

    checkpoint_keys: ClassVar[dict[str, str]] = {
        "clip_adapter_down": "clip_adapter.fc1.weight", "clip_adapter_up": "clip_adapter.fc2.weight"}
    supported_layers = (nn.Module,)  # chosen by role (the CLIP projections), not by layer type

    def __init__(self, base: nn.Module, config: ClipAdapterConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        d = base.out_features
        hidden = _hidden(d, config.reduction)
        factory = {"dtype": adapter_dtype(base, keep_half=True), "device": base.weight.device}
        self.alpha = float(config.alpha)
        self.clip_adapter_down = nn.Parameter(torch.empty(hidden, d, **factory))
        self.clip_adapter_up = nn.Parameter(torch.empty(d, hidden, **factory))
        for p in (self.clip_adapter_down, self.clip_adapter_up):  # nn.Linear's default init
            nn.init.kaiming_uniform_(p, a=math.sqrt(5)) if init else nn.init.zeros_(p)

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ClipAdapterConfig) -> None:
        for flag, role in (("image", "image_features"), ("text", "text_features")):
            if getattr(config, flag) and find_path(model, named, role, None) is None:
                raise not_applicable("clip_adapter", model, f"no CLIP {flag} projection (role {role!r}; "
                                     f"ClipAdapterConfig.{flag}=True)")

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ClipAdapterConfig) -> list[str]:
        roles = [r for flag, r in ((config.image, "image_features"), (config.text, "text_features")) if flag]
        return [find_path(model, named, role, None) for role in roles]

    @classmethod
    def param_count(cls, base: nn.Module, config: ClipAdapterConfig, key: str = "") -> int:
        """Closed form per adapted feature: 2 x D x (D / r)."""
        d = base.out_features
        return 2 * d * _hidden(d, config.reduction)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        a = F.relu(F.linear(F.relu(F.linear(out, self.clip_adapter_down.to(out.dtype))),
                            self.clip_adapter_up.to(out.dtype)))  # (B, D) -> (B, D / r) -> (B, D)
        return self.alpha * a + (1.0 - self.alpha) * out


def _hidden(d: int, reduction: int) -> int:
    return max(1, d // reduction)
