"""``peftkit.hotswap``, the public import path of LoRA hot-swapping (as peft's ``peft.utils.hotswap``); the code
lives with the LoRA family in ``methods/lora/hotswap.py``."""

from .methods.lora.hotswap import (HotswapError, check_hotswap_configs_compatible, hotswap_adapter,
                                   hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap)

__all__ = ["HotswapError", "check_hotswap_configs_compatible", "hotswap_adapter",
           "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"]
