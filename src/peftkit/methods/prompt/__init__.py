"""Prompt methods for language models: prompt tuning, P-tuning, prefix tuning, P-tuning v2, LLaMA-Adapter.

Importing this package registers them (each module holds one ``@register_method``). P-tuning v2 shares
prefix tuning's PEFT type ``PREFIX_TUNING``; it registers with ``primary=False``, so the type resolves to
prefix tuning whatever the import order.
"""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .adaption_prompt import AdaptionPromptConfig  # noqa: E402
from .base import PromptLearningConfig  # noqa: E402
from .cpt import CPTConfig  # noqa: E402
from .multitask import MultitaskPromptTuningConfig, MultitaskPromptTuningInit  # noqa: E402
from .p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType  # noqa: E402
from .p_tuning_v2 import PTuningV2Config  # noqa: E402
from .prefix_tuning import PrefixTuningConfig  # noqa: E402
from .prompt_tuning import PromptTuningConfig, PromptTuningInit  # noqa: E402

__all__ = ["AdaptionPromptConfig", "CPTConfig", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit", "PTuningV2Config", "PrefixTuningConfig", "PromptEncoderConfig",
           "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit"]
