"""peftkit: parameter-efficient fine-tuning for foundation models, drop-in compatible with Hugging Face PEFT."""

from .config import ConfigError, PeftConfig, TaskType
from .layers import Adapter, AdapterLayer
from .methods.adalora import AdaLoraConfig
from .methods.adapters import (
    AdaptFormerConfig,
    Average,
    BottleneckConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    CompositionConfig,
    Fuse,
    HoulsbyConfig,
    HybridConfig,
    MamConfig,
    Parallel,
    ParallelAdapterConfig,
    PfeifferConfig,
    Stack,
    UniPeltConfig,
)
from .methods.fourierft import FourierFTConfig
from .methods.glora import GloraConfig
from .methods.ia3 import IA3Config
from .methods.supertuning import SupertuningConfig
from .methods.lora import LoraConfig
from .methods.lora.corda import preprocess_corda
from .methods.lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from .methods.lora.init_configs import CordaConfig, EvaConfig, LoraGAConfig
from .methods.lora.variant_configs import (
    BdLoraConfig, KasaConfig, LoraRuntimeConfig, MontecloraConfig, VeloraConfig,
)
from .methods.lora.loraga import preprocess_loraga
from .methods.lora.arrow import ArrowConfig, create_arrow_model
from .methods.hira import HiraConfig
from .methods.delora import DeloraConfig
from .methods.peanut import PeanutConfig
from .methods.deft import DeftConfig
from .methods.poly import PolyConfig
from .methods.prompt import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from .methods.prompt import CPTConfig
from .methods.prompt.cartridge import CartridgeConfig
from .methods.prompt.cartridge_utils import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)
from .methods.beft import BeftConfig
from .methods.difffit import DiffFitConfig
from .methods.llama_adapter_v2 import LlamaAdapterV2Config
from .methods.svdiff import SVDiffConfig
from .methods.controlnet import ControlNetConfig, load_controlnet, save_controlnet
from .methods.t2i_adapter import T2IAdapterConfig, load_t2i_adapter, save_t2i_adapter
from .methods.c3a import C3AConfig
from .methods.osf import OSFConfig
from .methods.waveft import WaveFTConfig
from .methods.adamss import AdamssConfig
from .methods.road import RoadConfig
from .methods.madx import PfeifferInvConfig
from .methods.lorafa import LoraFAConfig
from .methods.deltalora import DeltaLoraConfig, delta_lora_step
from .methods.dylora import DyLoraConfig, set_rank
from .methods.hra import HRAConfig
from .methods.lycoris import LoHaConfig, LoKrConfig
from .methods.miss import MissConfig
from .methods.oft import BOFTConfig, OFTConfig
from .methods.psoft import PsoftConfig
from .methods.randlora import RandLoraConfig
from .methods.frod import FrodConfig
from .methods.gralora import GraloraConfig
from .methods.lily import LilyConfig
from .methods.prompt import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    PTuningV2Config,
)
from .methods.selective import (
    BitFitConfig,
    ChildTuningConfig,
    DiffPruningConfig,
    FishMaskConfig,
    LastKConfig,
    LNTuningConfig,
    SelectionError,
    fisher_diagonal,
    fisher_mask,
    l0_penalty,
    project_to_sparsity,
    selection_summary,
)
from .methods.shira import ShiraConfig
from .methods.ssf import SSFConfig
from .methods.trainable_tokens import TrainableTokensConfig
from .methods.textual_inversion import TextualInversionConfig, add_textual_inversion, save_textual_inversion
from .methods.vera import VeraConfig
from .methods.pvera import PveraConfig
from .methods.vblora import VBLoRAConfig
from .methods.convpass import ConvpassConfig
from .methods.fact import FacTConfig
from .methods.xlora import XLoraConfig
from .methods.shadow import ShadowConfig
from .methods.lst import LSTConfig
from .methods.ip_adapter import IPAdapterConfig, save_ip_adapter, set_ip_adapter_scale
from .methods.mole import MoleConfig
from .methods.adapterdrop import AdapterDropConfig
from .methods.unilora import UniLoraConfig
from .methods.tinylora import TinyLoraConfig
from .methods.vision import build_cache, classify, set_tokenizer
from .methods.vision.clip_adapter import ClipAdapterConfig
from .methods.vision.coop import CoCoOpConfig, CoOpConfig
from .methods.vision.tip_adapter import TipAdapterConfig
from .methods.vision.vpt import VPTConfig
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
from .mixed_model import PeftMixedModel
from .auto import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_config
from .peft_types import LoftQConfig, PeftType
from .peft_utils import (
    cast_mixed_precision_params,
    get_base_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    shift_tokens_right,
)
from .status import get_layer_status, get_model_status
from .methods.lora.conversion import convert_to_lora, save_as_lora
from .methods.lora.optim import create_loraplus_optimizer
from .quant import prepare_model_for_kbit_training, quantize_model
from .registry import MethodSpec, get_method, list_methods, register_method
from .tuner import TunerModel

LoraModel = TunerModel  # the name Hugging Face PEFT gives the LoRA tuner

from ._version import __version__  # noqa: E402

__all__ = [
    "SupertuningConfig",
    "BeftConfig", "C3AConfig",
    "LoraFAConfig", "DeltaLoraConfig", "delta_lora_step", "DyLoraConfig", "set_rank",
    "OSFConfig",
    "PeanutConfig",
    "DeftConfig",
    "GloraConfig",
    "RandLoraConfig", "FrodConfig", "GraloraConfig", "LilyConfig",
    "BOFTConfig", "OFTConfig",
    "BitFitConfig", "ChildTuningConfig", "DiffPruningConfig", "FishMaskConfig", "LNTuningConfig", "LastKConfig",
    "SelectionError", "fisher_diagonal", "fisher_mask", "l0_penalty", "project_to_sparsity", "selection_summary",
    "AdaLoraConfig", "AdamssConfig", "Adapter", "AdapterLayer", "ConfigError", "DeloraConfig", "PolyConfig", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit", "CPTConfig", "CartridgeConfig", "compose_cartridge_adapters", "initialize_kv_prefix_from_past_key_values", "initialize_kv_prefix_from_text", "prompt_embeddings_from_past_key_values", "WaveFTConfig", "RoadConfig", "HRAConfig", "PsoftConfig", "FourierFTConfig", "HiraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LoraConfig", "LoraModel", "MethodSpec", "MissConfig", "PeftConfig", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "SSFConfig", "ShiraConfig", "TaskType", "TinyLoraConfig", "TrainableTokensConfig", "TextualInversionConfig", "add_textual_inversion", "save_textual_inversion", "TunerModel", "UniLoraConfig", "VBLoRAConfig", "ConvpassConfig", "FacTConfig", "XLoraConfig", "ShadowConfig", "LSTConfig", "IPAdapterConfig", "save_ip_adapter", "set_ip_adapter_scale", "MoleConfig", "DiffFitConfig", "LlamaAdapterV2Config", "SVDiffConfig", "ControlNetConfig", "T2IAdapterConfig", "load_controlnet", "save_controlnet", "load_t2i_adapter", "save_t2i_adapter", "AdapterDropConfig", "VeraConfig", "PveraConfig", "convert_to_lora", "create_loraplus_optimizer", "save_as_lora", "get_method", "get_peft_model",
    "get_peft_model_state_dict", "inject_adapter_in_model", "list_methods", "register_method",
    "set_peft_model_state_dict", "prepare_model_for_kbit_training", "quantize_model", "hotswap_adapter", "prepare_model_for_compiled_hotswap",
    "AdaptionPromptConfig", "PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
    "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit", "PTuningV2Config",
    "ClipAdapterConfig", "CoCoOpConfig", "CoOpConfig", "TipAdapterConfig", "VPTConfig",
    "build_cache", "classify", "set_tokenizer",
    "AdaptFormerConfig", "Average", "BottleneckConfig", "CompacterConfig", "CompacterPlusPlusConfig",
    "CompositionConfig", "Fuse", "HoulsbyConfig", "HybridConfig", "MamConfig", "Parallel", "ParallelAdapterConfig",
    "PfeifferConfig", "PfeifferInvConfig", "Stack", "UniPeltConfig",
    # peft's other public names (docs/compatibility.md, "peft's public names", lists those peftkit lacks)
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "PEFT_TYPE_TO_CONFIG_MAPPING", "get_peft_config", "LoftQConfig", "PeftType",
    "cast_mixed_precision_params", "get_base_model_state_dict", "load_peft_weights", "set_base_model_state_dict",
    "shift_tokens_right", "get_layer_status", "get_model_status",
    "CordaConfig", "EvaConfig", "LoraGAConfig", "get_eva_state_dict", "initialize_lora_eva_weights",
    "preprocess_corda", "preprocess_loraga",
    "KasaConfig", "LoraRuntimeConfig", "VeloraConfig", "MontecloraConfig", "BdLoraConfig",
    "ArrowConfig", "create_arrow_model",
    "PeftMixedModel",
]

from . import compat as _compat  # noqa: E402 - last: the served `peft` is built from the names above
from .compat import serve_as_peft  # noqa: E402

_compat._activate_on_import()
