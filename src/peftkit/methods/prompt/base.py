"""What the prompt methods share: the config fields Hugging Face PEFT's ``PromptLearningConfig`` has, their
defaults read from the model's config, and where a prompt adapter is hosted (the input embedding)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from ...config import ConfigError, PeftConfig, TaskType, check_int
from .hook import PromptAdapter
from .inputs import accepts_cache, forward_params, input_embeddings
from ...targeting import NotApplicableError

# what to suggest when a method does not fit a model
OTHER_METHODS = ("layer methods (lora, ia3, ...) apply to any Linear layer; vision transformers take visual prompts "
                 "(VPT) instead")


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields of every virtual-token method (names and defaults as in Hugging Face PEFT).

    Args:
        num_virtual_tokens: number of virtual tokens ``n`` (required).
        token_dim: hidden size of the base model (filled from the model's config when None).
        num_transformer_submodules: 2 for encoder-decoder LMs with task_type SEQ_2_SEQ_LM, else 1 (filled).
        num_attention_heads: attention heads (filled; key/value heads for prefix tuning on GQA models).
        num_layers: transformer layers (filled).
        modules_to_save: modules trained in full and saved (the task head for SEQ_CLS is added automatically).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_virtual_tokens", 1, optional=True, expected="a positive int")
        s = self.num_transformer_submodules
        self._check(s in (None, 1, 2), "num_transformer_submodules", "1 or 2")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def model_config_dict(model: nn.Module) -> tuple[Any, dict[str, Any]]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None, {}
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return cfg, data.get("text_config") or data


def fill_config(model: nn.Module, config: PromptLearningConfig, kv_heads: bool = False) -> None:
    """PEFT's ``_prepare_prompt_learning_config``: fill the model-dependent fields that are None.

    ``kv_heads``: prefix tuning on grouped-query attention stores keys/values for the key/value heads only
    (``token_dim = head_dim * num_key_value_heads``, ``num_attention_heads = num_key_value_heads``)."""
    if config.num_virtual_tokens is None:
        raise ConfigError(f"{type(config).__name__}.num_virtual_tokens: required (the number of virtual tokens)")
    cfg, data = model_config_dict(model)

    def first(*keys: str) -> Any:
        return next((data[k] for k in keys if data.get(k) is not None), None)

    if config.num_layers is None:
        config.num_layers = getattr(cfg, "num_hidden_layers", None) or first("num_hidden_layers", "num_layers",
                                                                             "n_layer")
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    for name in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, name) is None:
            raise ConfigError(f"{type(config).__name__}.{name}: cannot read it from {type(model).__name__}'s config; "
                              "set it explicitly")
    if kv_heads and data.get("num_key_value_heads") is not None:
        head_dim = data.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * data["num_key_value_heads"]
        config.num_attention_heads = data["num_key_value_heads"]
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


def embedding_path(model: nn.Module, named: list[tuple[str, nn.Module]], method: str, needs: str) -> list[str]:
    """The path of ``model``'s input embedding (the host of a prompt adapter), or NotApplicableError."""
    emb = input_embeddings(model)
    base = emb.base_layer if hasattr(emb, "base_layer") else emb
    paths = [p for p, m in named if p and m is base]
    if not isinstance(base, nn.Embedding) or not paths:
        raise NotApplicableError(
            f"{method} needs {needs}, and {type(model).__name__} has no token input embedding "
            f"(get_input_embeddings); {OTHER_METHODS}")
    return paths[:1]


class EmbeddingPrompt(PromptAdapter):
    """Base of the methods that prepend virtual tokens to the input embeddings (prompt tuning, P-tuning)."""

    method: ClassVar[str] = ""

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        cls.select_targets(model, named, config)  # not applicable: say so before reading the model's config
        fill_config(model, config)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        path = embedding_path(model, named, cls.method, "token inputs to prepend virtual tokens to")
        if "inputs_embeds" not in forward_params(model):
            raise NotApplicableError(f"{cls.method} needs a model whose forward takes inputs_embeds; "
                                     f"{type(model).__name__}.forward does not; {OTHER_METHODS}")
        return path


class KVPrompt(PromptAdapter):
    """Base of the methods that give every attention layer a key/value prefix (prefix tuning, P-tuning v2)."""

    method: ClassVar[str] = ""

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        cls.select_targets(model, named, config)  # not applicable: say so before reading the model's config
        fill_config(model, config, kv_heads=True)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        if not accepts_cache(model):
            raise NotApplicableError(
                f"{cls.method} needs a model with a KV-cache interface (a forward taking cache / past_key_values), "
                f"and {type(model).__name__} has none; prompt_tuning or p_tuning prepend tokens instead when the "
                f"model takes inputs_embeds; {OTHER_METHODS}")
        return embedding_path(model, named, cls.method, "an input embedding to host its prefix")
