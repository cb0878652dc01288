"""Prompt methods for language models: prompt tuning, P-tuning, prefix tuning, P-tuning v2, LLaMA-Adapter.

Importing this package registers them (each module holds one ``@register_method``). Prefix tuning is
imported before P-tuning v2 so that the PEFT type ``PREFIX_TUNING`` resolves to prefix tuning.
"""

from .adaption_prompt import AdaptionPromptConfig
from .base import PromptLearningConfig
from .p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixTuningConfig
from .p_tuning_v2 import PTuningV2Config  # noqa: I001  (after prefix_tuning, see above)
from .prompt_tuning import PromptTuningConfig, PromptTuningInit

__all__ = ["AdaptionPromptConfig", "PTuningV2Config", "PrefixTuningConfig", "PromptEncoderConfig",
           "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit"]
