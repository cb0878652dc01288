"""peftkit: parameter-efficient fine-tuning for foundation models, drop-in compatible with Hugging Face PEFT."""

from .config import ConfigError, PeftConfig, TaskType
from .layers import Adapter, AdapterLayer
from .methods.fourierft import FourierFTConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.lycoris import LoHaConfig, LoKrConfig
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from .optim import create_loraplus_optimizer
from .registry import MethodSpec, get_method, list_methods, register_method
from .tuner import TunerModel

LoraModel = TunerModel  # the name Hugging Face PEFT gives the LoRA tuner

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterLayer", "ConfigError", "FourierFTConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LoraConfig", "LoraModel", "MethodSpec", "PeftConfig", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "TaskType", "TunerModel", "create_loraplus_optimizer", "get_method", "get_peft_model",
    "get_peft_model_state_dict", "inject_adapter_in_model", "list_methods", "register_method",
    "set_peft_model_state_dict",
]
