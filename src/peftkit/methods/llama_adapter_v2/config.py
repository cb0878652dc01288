"""LLaMA-Adapter V2's configuration (the math: ``layer.py``'s module docstring)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int


@dataclasses.dataclass
class LlamaAdapterV2Config(PeftConfig):
    """LLaMA-Adapter V2 configuration (not in Hugging Face PEFT).

    Args:
        adapter_len: K, the adaption prompt tokens per prompted attention layer (the paper's 10).
        adapter_layers: L, the top language-model layers whose adaption prompts stay text-only; None: every
            layer after the visual ones (on a 32-layer LLaMA with one visual layer: 31).
        visual_layers: V, the first language-model layers whose adaption prompts get the visual prompt added
            (early fusion); None: 1 on a model with a ``visual_module``, 0 otherwise. V + L must not exceed
            the number of layers (the two sets are disjoint, as the paper's).
        visual_module: the module whose output is the projected image features (LLaVA's
            ``multi_modal_projector``): a name or dotted path suffix; resolved to its full path on injection.
        bias_scale: y = s * (W x + b) on every linear layer of the language model's blocks (b = 0, s = 1 at
            the start).
        tune_norms: a scale (and a bias where the norm has one) on every normalization layer of the language
            model: the paper's unfrozen norms, as a re-parameterization that merges into the norm's weight.
        modules_to_save: modules trained in full and saved with the adapter (the paper trains the visual
            projection in its image-text stage: ``["multi_modal_projector"]``).
    """

    PEFT_TYPE: ClassVar[str] = "LLAMA_ADAPTER_V2"

    adapter_len: int = 10
    adapter_layers: int | None = None
    visual_layers: int | None = None
    visual_module: str = "multi_modal_projector"
    bias_scale: bool = True
    tune_norms: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "adapter_len", 1, expected="a positive int")
        for name in ("adapter_layers", "visual_layers"):
            check_int(self, name, 0, optional=True, expected="an int >= 0 (or None)")
        self._check(isinstance(self.visual_module, str) and bool(self.visual_module), "visual_module",
                    "a module name (a non-empty string)")
        check_bool(self, "bias_scale", "tune_norms")
        if (self.modules_to_save is not None and not (isinstance(self.modules_to_save, list)
                                                      and all(isinstance(m, str) for m in self.modules_to_save))):
            raise ConfigError(f"{type(self).__name__}.modules_to_save: expected a list of module names, "
                              f"got {self.modules_to_save!r}")

    def resolve_layers(self, num_layers: int, has_visual: bool, model_name: str) -> None:
        """Fill V and L for a language model of ``num_layers`` layers (``has_visual``: the model has the visual
        module); raise ``ConfigError`` naming the field when they do not fit."""
        name = type(self).__name__
        if self.visual_layers is None:
            self.visual_layers = 1 if has_visual and num_layers > 1 else 0
        if self.visual_layers and not has_visual:
            raise ConfigError(
                f"{name}.visual_layers: {self.visual_layers} early layers asked to fuse the visual prompt, but "
                f"{model_name} has no {self.visual_module!r} module (visual_module) giving projected image features; "
                "set visual_layers=0 for a text-only model")
        if self.visual_layers > num_layers:
            raise ConfigError(f"{name}.visual_layers: expected at most the {num_layers} layers of {model_name}'s "
                              f"language model, got {self.visual_layers}")
        if self.adapter_layers is None:
            self.adapter_layers = num_layers - self.visual_layers
        if self.visual_layers + self.adapter_layers > num_layers:
            raise ConfigError(
                f"{name}.adapter_layers: {self.adapter_layers} top layers plus visual_layers={self.visual_layers} "
                f"early layers exceed the {num_layers} layers of {model_name}'s language model (the two sets are "
                f"disjoint): expected adapter_layers <= {num_layers - self.visual_layers}")
