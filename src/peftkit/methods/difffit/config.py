"""DiffFitConfig: which biases and norm layers train, and where the scale factors gamma go; validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...config import ConfigError, check_bool
from ..selective.config import SelectiveConfig


def _names_ok(value: Any) -> bool:
    """None, a full-match regex, or a list of module names / dotted suffixes."""
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value)


@dataclasses.dataclass
class DiffFitConfig(SelectiveConfig):
    """DiffFit (Xie et al. 2023, arXiv 2304.06648): train the biases, the normalization layers' affine parameters
    and a scale factor gamma (init 1) on each block's residual branches; everything else stays frozen.

    Args:
        target_modules: modules whose bias (and, for normalization layers, weight and bias) train: names /
            dotted suffixes, or a full-match regex; None: every bias and every normalization layer of the model
            (LayerNorm, GroupNorm, RMSNorm and a model's own ``*Norm`` classes), except the task head and
            ``modules_to_save``.
        exclude_modules: names or regex never to train (biases, norms or gamma).
        scale_modules: the last projection of each residual branch, whose output gamma scales (one gamma per
            output channel): names / dotted suffixes or a full-match regex; None: the architecture's residual
            branch outputs (the attention output and FFN output projections of each transformer block; on a
            diffusers UNet also each ResNet block's ``conv2``, see ``layer.py``); ``[]``: no gamma (BitFit plus
            norm tuning). Filled in with the full paths when the adapter is built, so the saved config says
            exactly where gamma sits.
        train_bias: train the biases of the targeted modules.
        train_norm: train the weight and bias of the targeted normalization layers.
        modules_to_save: modules trained in full and saved with the adapter (the paper also trains DiT's class
            embedding: list it here); the task head is added for classification task types.
    """

    PEFT_TYPE: ClassVar[str] = "DIFFFIT"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    scale_modules: list[str] | str | None = None
    train_bias: bool = True
    train_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # target_modules / exclude_modules are checked (and made sets) by PeftConfig, as peft's name fields
        self._check(_names_ok(self.scale_modules), "scale_modules",
                    "None, a regex string or a list of non-empty module names")
        if isinstance(self.scale_modules, (tuple, set, frozenset)):
            self.scale_modules = sorted(self.scale_modules)
        check_bool(self, "train_bias", "train_norm")
        if not self.train_bias and not self.train_norm and self.scale_modules == []:
            raise ConfigError("DiffFitConfig.scale_modules: expected gamma targets (None or a non-empty list) when "
                              "train_bias and train_norm are both False, got [] (nothing would train)")
