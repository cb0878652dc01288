"""ShadowConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability

MIRROR_OVERRIDES = ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                    "shadow_intermediate_size")


@dataclasses.dataclass
class ShadowConfig(PeftConfig):
    """ShadowPEFT: a small trainable shadow network riding a frozen decoder's layer loop.

    Args:
        target_modules: the decoder blocks to wrap (whole blocks, not Linear layers): names, or a full-match
            regex such as ``r'.*\\.layers\\.\\d+$'``. None (the default) wraps every decoder block; the choice is
            written back into the config as the blocks' paths (as peft does).
        exclude_modules: names or regex of blocks not to wrap.
        r: rank of the injection bottleneck ``W_down`` (d -> r) / ``W_up`` (r -> d).
        shadow_alpha: strength of the correction added to each block's input (Eq. 4).
        shadow_dropout: dropout on the discrepancy ``h - s`` before the bottleneck (Eq. 3).
        init_weights: True: ``W_up`` starts at zero, so the model starts at the base.
        shadow_model: ``"mirror"`` builds a fresh backbone of the base architecture (``shadow_*`` sizes below);
            any other string is a local folder of a pretrained backbone (transformers' ``AutoModel``, or a
            ``causal_lm_with_hidden_projection`` checkpoint with its trained projection).
        shadow_num_hidden_layers: depth of the mirror backbone (None: 1).
        shadow_hidden_size: width of the mirror backbone (None: the base's); another width inserts a projection.
        shadow_num_attention_heads: attention heads of the mirror backbone (None: the base's).
        shadow_intermediate_size: feed-forward width of the mirror backbone (None: the base's).
        share_embeddings: feed the mirror backbone the frozen base input embeddings instead of its own table.
        update_hidden_size: hidden width of the update MLPs ``T`` and ``G`` (None: ``r``).
        auxiliary_loss_weight: weight of the shadow path's own task loss on ``s^(0)`` (Eq. 8-9), added to the
            model's loss when labels are passed; 0 turns it off.
        layers_to_transform / layers_pattern: keep only these block indices.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``lm_head``).
    """

    PEFT_TYPE: ClassVar[str] = "SHADOW"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_number(self, "shadow_alpha")
        check_probability(self, "shadow_dropout")
        check_bool(self, "init_weights", "share_embeddings")
        self._check(isinstance(self.shadow_model, str) and bool(self.shadow_model), "shadow_model",
                    "'mirror' or the folder of a pretrained shadow backbone")
        for name in (*MIRROR_OVERRIDES, "update_hidden_size"):
            check_int(self, name, 1, optional=True)
        check_number(self, "auxiliary_loss_weight", minimum=0)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError("ShadowConfig.layers_to_transform / layers_pattern: cannot be used when target_modules "
                              f"is a regex string ({self.target_modules!r}); give a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("ShadowConfig.layers_pattern: only meaningful together with layers_to_transform")
        if self.shadow_model != "mirror":
            given = [n for n in MIRROR_OVERRIDES if getattr(self, n) is not None]
            if given:
                raise ConfigError(f"ShadowConfig.{given[0]}: a pretrained shadow_model ({self.shadow_model!r}) "
                                  f"defines its own architecture; expected None for {', '.join(given)}")
