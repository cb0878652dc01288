"""XLoraConfig: field names and defaults as in Hugging Face PEFT, validated when built."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class XLoraConfig(PeftConfig):
    """X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148): a mixture of frozen LoRA experts.

    Args:
        hidden_size: width of the base model's last hidden state, which the scaling head reads (peft: 4096,
            with a warning, when not given).
        adapters: expert name -> folder of a saved LoRA adapter (``PeftModel.save_pretrained`` of peft or
            peftkit). The order is the experts' order in the head's output.
        enable_softmax: softmax over the experts of the head's logits (divided by ``softmax_temperature``).
        enable_softmax_topk: softmax over the ``top_k_lora`` kept experts only (per layer, per token).
        layerwise_scalings: the head outputs one scaling per (layer, expert); False: one per expert, broadcast
            to every layer.
        top_k_lora: keep only the k largest scalings per token and layer (None: dense).
        xlora_depth: number of Linear layers of the head (ReLU between them).
        xlora_size: width of the head's hidden layers (unused when ``xlora_depth == 1``).
        xlora_dropout_p: dropout after each hidden ReLU of the head (unused when ``xlora_depth == 1``).
        use_trainable_adapters: the experts train too (default: only the head).
        softmax_temperature: temperature of the head's softmax.
        scaling_pass_value: the scaling every expert gets during the first (scaling) pass.
        global_scaling_weight: factor on every expert's output in the second pass.
    """

    PEFT_TYPE: ClassVar[str] = "XLORA"

    hidden_size: int = None  # type: ignore[assignment]
    adapters: dict[str, str] = None  # type: ignore[assignment]
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size is None:  # peft's defaults and warnings
            warnings.warn("No value was provided for `hidden_size`. This will be set to 4096 by default, please "
                          "ensure that this is correct.")
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn("No value was provided for `adapters`. This will be set to empty, please ensure that "
                          "this is correct.")
            self.adapters = {}
        check_int(self, "hidden_size", 1)
        check_int(self, "xlora_depth", 1)
        check_int(self, "xlora_size", 1)
        check_int(self, "top_k_lora", 1, optional=True)
        check_probability(self, "xlora_dropout_p")
        check_number(self, "softmax_temperature", above=0)
        check_number(self, "scaling_pass_value")
        check_number(self, "global_scaling_weight")
        check_bool(self, "enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters")
        if not isinstance(self.adapters, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.adapters.items()):
            raise ConfigError(f"XLoraConfig.adapters: expected a dict expert name -> LoRA adapter folder (str), got "
                              f"{self.adapters!r}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set")
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse "
                          "performance.")
