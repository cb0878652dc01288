"""Tip-Adapter and Tip-Adapter-F (Zhang et al. 2022, arXiv 2207.09519): a few-shot cache model over CLIP.

From N classes x K shots: keys F (NK, D) = L2-normalised CLIP image features of the support images, values
L (NK, N) = their one-hot labels. For a test feature f (B, D), normalised:

    logits = alpha * exp(-beta (1 - f F^T)) L  +  logit_scale.exp() * f W_c^T

with W_c (N, D) CLIP's text classifier of the class names (``classify`` builds it; with an active CoOp the
learned prompts). The paper writes 100 for CLIP's logit scale, which is logit_scale.exp() of pretrained CLIP.
Defaults alpha = 1.17, beta = 1 (the paper's ImageNet values; it tunes both per data set).
Tip-Adapter is training-free: F and L are buffers. Tip-Adapter-F (``train_keys``) makes F a parameter
(initialised from the cache, trained with cross-entropy over ``classify``); L stays fixed.

The adapter sits on ``visual_projection`` (role ``image_features``) only to hold the cache; its forward is
the identity, so the plain CLIP forward is unchanged: the method acts through ``classify``.
Usage: ``build_cache(model, support_pixels, labels)``, then ``model.classify(pixels, class_names, ...)``.
``build_cache`` writes the cache size into the config, so a saved adapter loads with the right shapes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import PeftConfig, check_bool, check_int, check_number
from ...kernel_helpers import adapter_dtype
from ...registry import register_method
from . import clip as clip_api
from ._roles import find_path, not_applicable


@dataclasses.dataclass
class TipAdapterConfig(PeftConfig):
    """Tip-Adapter configuration.

    Args:
        alpha: weight of the cache logits (paper: 1.17 on ImageNet).
        beta: sharpness of the affinity exp(-beta (1 - cos)) (paper: 1.0).
        train_keys: Tip-Adapter-F, train the cache keys F.
        cache_size: N x K, the number of cached support features (set by ``build_cache``).
        num_classes: N (set by ``build_cache``).
    """

    PEFT_TYPE: ClassVar[str] = "TIP_ADAPTER"

    alpha: float = 1.17
    beta: float = 1.0
    train_keys: bool = False
    cache_size: int = 0
    num_classes: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "alpha", minimum=0, expected="a float >= 0")
        check_number(self, "beta", minimum=0, expected="a float >= 0")
        check_bool(self, "train_keys")
        for name in ("cache_size", "num_classes"):
            check_int(self, name, 0, expected="an int >= 0")


@register_method(
    "tip_adapter",
    config=TipAdapterConfig,
    category="additive",
    modalities=("vision-language",),
    mergeable=False,
    param_formula="0 (Tip-Adapter, training-free); N K x D (Tip-Adapter-F trains the keys)",
    position="a key-value cache of few-shot CLIP image features beside the zero-shot classifier",
    starts_at_base=True,
    paper="arXiv 2207.09519 (Tip-Adapter, Zhang et al. 2022)",
    examples={"tip_adapter": {"train_keys": True, "cache_size": 4, "num_classes": 2}},
)
class TipCache(clip_api.LogitCache):
    """The cache: ``tip_keys`` F (NK, D), a buffer, or a parameter for Tip-Adapter-F; ``tip_labels`` (NK,)."""

    checkpoint_keys: ClassVar[dict[str, str]] = {"tip_keys": "tip_adapter.cache_keys",
                                                 "tip_labels": "tip_adapter.cache_labels"}
    supported_layers = (nn.Module,)  # chosen by role (the CLIP projections), not by layer type

    def __init__(self, base: nn.Module, config: TipAdapterConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.config = config  # build_cache records the cache's size in it
        w = base.weight
        dtype = adapter_dtype(base, keep_half=True)
        keys = torch.zeros(config.cache_size, base.out_features, dtype=dtype, device=w.device)
        if config.train_keys:
            self.tip_keys = nn.Parameter(keys)
        else:
            self.register_buffer("tip_keys", keys)
        self.register_buffer("tip_labels", torch.zeros(config.cache_size, dtype=torch.long, device=w.device))

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: TipAdapterConfig) -> None:
        if find_path(model, named, "image_features", None) is None or not hasattr(model, "get_text_features"):
            raise not_applicable("tip_adapter", model, "no CLIP image projection (role 'image_features') and "
                                 "text tower to build the cache and the zero-shot classifier from")
        problem = clip_api.pooling_problem(model)
        if problem:  # W_c, the zero-shot text classifier, cannot be built
            raise not_applicable("tip_adapter", model, problem)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: TipAdapterConfig) -> list[str]:
        clip_api.bind_api(model)
        return [find_path(model, named, "image_features", None)]

    @classmethod
    def param_count(cls, base: nn.Module, config: TipAdapterConfig, key: str = "") -> int:
        """Closed form: N K x D trained keys for Tip-Adapter-F, none for the training-free Tip-Adapter."""
        return config.cache_size * base.out_features if config.train_keys else 0

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return out  # the cache acts in classify, on the classifier's logits

    @torch.no_grad()
    def set_cache(self, feats: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
        """Replace the cache with normalised features (NK, D) and integer labels (NK,)."""
        if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
            raise ValueError(f"labels: expected shape ({feats.shape[0]},), one per image, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or (labels.numel() and labels.min() < 0):
            raise ValueError("labels: expected non-negative integer class indices")
        n = int(labels.max()) + 1 if num_classes is None else num_classes
        if labels.numel() and labels.max() >= n:
            raise ValueError(f"num_classes: {n} but labels go up to {int(labels.max())}")
        keys = feats.detach().to(self.tip_keys.dtype).clone()
        if isinstance(self.tip_keys, nn.Parameter):
            self.tip_keys = nn.Parameter(keys, requires_grad=self.tip_keys.requires_grad)
        else:
            self.tip_keys = keys
        self.tip_labels = labels.to(self.tip_labels.device, torch.long).clone()
        self.config.cache_size, self.config.num_classes = int(keys.shape[0]), n

    def cache_logits(self, f: Tensor, num_classes: int) -> Tensor:
        """alpha * exp(-beta (1 - f F^T)) L: (B, D) -> (B, N)."""
        if self.tip_keys.shape[0] == 0:
            raise RuntimeError("tip_adapter: the cache is empty; call build_cache(model, images, labels) first")
        if num_classes != self.config.num_classes:
            raise ValueError(f"tip_adapter: the cache holds {self.config.num_classes} classes "
                             f"(TipAdapterConfig.num_classes), classify got {num_classes} class names")
        affinity = f @ self.tip_keys.to(f.dtype).t()  # (B, NK)
        values = F.one_hot(self.tip_labels, num_classes).to(f.dtype)  # (NK, N)
        return self.config.alpha * torch.exp(-self.config.beta * (1.0 - affinity)) @ values
