"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv 2104.08691): a learned matrix P (n x d) is prepended to the input embeddings, ``[P; E(x)]``.

P starts random (``RANDOM``, standard normal as ``nn.Embedding``), from the embeddings of random vocabulary
tokens (``SAMPLE_VOCAB``) or from the embeddings of a text (``TEXT``, repeated or cut to n tokens). Checkpoint
as Hugging Face PEFT: ``prompt_embeddings`` (n * num_transformer_submodules, d).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError
from .inputs import embed_encoder_prompts, embed_prompts
from ...registry import register_method
from .base import EmbeddingPrompt, PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        prompt_tuning_init: ``RANDOM`` | ``SAMPLE_VOCAB`` | ``TEXT``.
        prompt_tuning_init_text: the text whose token embeddings initialise P (``TEXT``).
        tokenizer_name_or_path: a tokenizer name/path for ``AutoTokenizer``, or a tokenizer object (``TEXT``;
            an object is saved as its ``name_or_path``).
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (``TEXT``; ``trust_remote_code`` is
            dropped).
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str | PromptTuningInit = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(str(getattr(self.prompt_tuning_init, "value",
                                                                   self.prompt_tuning_init)).upper())
        except ValueError:
            raise ConfigError(f"PromptTuningConfig.prompt_tuning_init: expected one of "
                              f"{[i.value for i in PromptTuningInit]}, got {self.prompt_tuning_init!r}") from None
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ConfigError("PromptTuningConfig.tokenizer_name_or_path: required when prompt_tuning_init='TEXT'")
        if text and self.prompt_tuning_init_text is None:
            raise ConfigError("PromptTuningConfig.prompt_tuning_init_text: required when prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs and not text:
            raise ConfigError("PromptTuningConfig.tokenizer_kwargs: only valid with prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, str):
            out["tokenizer_name_or_path"] = getattr(tok, "name_or_path", None)
        return out


def init_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The token ids whose embeddings initialise a ``TEXT`` prompt: the text's ids, repeated and cut to ``total``."""
    tok = config.tokenizer_name_or_path
    if isinstance(tok, str):
        from transformers import AutoTokenizer  # late: the tokenizer stack loads only for a TEXT init

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # loading a config must never run remote code
        tok = AutoTokenizer.from_pretrained(tok, **kwargs)
    ids = list(tok(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError("PromptTuningConfig.prompt_tuning_init_text: the text tokenizes to no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]


@register_method(
    "prompt_tuning",
    config=PromptTuningConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="n * d (n virtual tokens, times 2 for SEQ_2_SEQ_LM)",
    position="virtual tokens prepended to the input embeddings",
    paper="arXiv 2104.08691 (Lester et al. 2021, prompt tuning)",
    examples={"prompt_tuning": {"num_virtual_tokens": 4}},
)
class PromptTuningAdapter(EmbeddingPrompt):
    method = "prompt_tuning"

    def __init__(self, base: nn.Embedding, config: PromptTuningConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim, device=base.weight.device)  # P: (n * S, d)
        if init and not config.inference_mode and config.prompt_tuning_init != PromptTuningInit.RANDOM:
            if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
                ids = torch.randint(0, base.num_embeddings, (total,))
            else:
                ids = torch.tensor(init_token_ids(config, total))
            with torch.no_grad():
                self.embedding.weight.copy_(base.weight[ids.to(base.weight.device)].float())

    @classmethod
    def param_count(cls, base: nn.Module, config: PromptTuningConfig, key: str = "") -> int:
        return config.total_virtual_tokens * config.token_dim

    def prompts(self) -> Tensor:
        return self.embedding.weight

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return embed_prompts(model, kwargs, self.num_virtual_tokens, self.prompts)

    def rewrite_encoder(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return embed_encoder_prompts(model, kwargs, self.prompts()[: self.num_virtual_tokens])

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.embedding.weight}
