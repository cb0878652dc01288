"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385): virtual tokens produced by a prompt
encoder over learned embeddings, ``P = f(E_v)`` with ``E_v`` (n, d) and f an MLP
``Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d)`` or a bidirectional LSTM followed by
``Linear(2h, 2h) - ReLU - Linear(2h, d)``; P is prepended to the input embeddings as in prompt tuning.

The encoder is only needed while training: outside training its output is cached (recomputed when a
parameter changes), and the checkpoint holds the output, ``prompt_embeddings`` (n, d), as Hugging Face PEFT
saves it. A loaded adapter is that tensor alone (PEFT's inference mode); loaded with ``is_trainable=True`` it
trains the prompts directly (PEFT would feed the saved output through a fresh, random encoder).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError, check_probability
from .inputs import embed_encoder_prompts, embed_prompts
from ...registry import register_method
from .base import EmbeddingPrompt, PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        encoder_reparameterization_type: ``MLP`` (3 layers; ``encoder_num_layers`` is ignored, as in PEFT) or
            ``LSTM`` (bidirectional, ``encoder_num_layers`` layers).
        encoder_hidden_size: hidden width h (None: token_dim).
        encoder_num_layers: LSTM layers.
        encoder_dropout: LSTM dropout between layers.
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str | PromptEncoderReparameterizationType = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(str(kind).upper())
        except ValueError:
            raise ConfigError(f"PromptEncoderConfig.encoder_reparameterization_type: expected MLP or LSTM, got "
                              f"{kind!r}") from None
        self._check(isinstance(self.encoder_num_layers, int) and self.encoder_num_layers >= 1,
                    "encoder_num_layers", "a positive int")
        check_probability(self, "encoder_dropout")


def encoder_param_count(config: PromptEncoderConfig) -> int:
    """Closed form of the prompt encoder's parameters (without the n x d embedding)."""
    d, h = config.token_dim, config.encoder_hidden_size
    if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.MLP:
        return (d * h + h) + (h * h + h) + (h * d + d)
    lstm = 0
    for layer in range(config.encoder_num_layers):
        d_in = d if layer == 0 else 2 * h
        lstm += 2 * (4 * h * d_in + 4 * h * h + 8 * h)  # two directions, W_ih, W_hh and two biases
    return lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


@register_method(
    "p_tuning",
    config=PromptEncoderConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="n d + MLP: d h + h + h h + h + h d + d (LSTM: bidirectional LSTM + 2-layer head)",
    position="virtual tokens from a prompt encoder, prepended to the input embeddings",
    paper="arXiv 2103.10385 (Liu et al. 2021, P-tuning)",
    examples={"p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 8},
              "p_tuning-lstm": {"num_virtual_tokens": 4, "encoder_hidden_size": 8,
                                "encoder_reparameterization_type": "LSTM"}},
)
class PTuningAdapter(EmbeddingPrompt):
    method = "p_tuning"

    def __init__(self, base: nn.Embedding, config: PromptEncoderConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        d, h = config.token_dim, config.encoder_hidden_size
        device = base.weight.device
        self.embedding = nn.Embedding(config.total_virtual_tokens, d, device=device)  # E_v: (n, d)
        self.encoder_type = config.encoder_reparameterization_type
        self.encode = init and not config.inference_mode  # loaded: ``embedding`` holds the encoder's output
        self._cache: tuple[tuple, Tensor] | None = None
        if not self.encode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device),
                                          nn.ReLU(), nn.Linear(h, d, device=device))

    @classmethod
    def param_count(cls, base: nn.Module, config: PromptEncoderConfig, key: str = "") -> int:
        extra = 0 if config.inference_mode else encoder_param_count(config)
        return config.total_virtual_tokens * config.token_dim + extra

    def _encode(self) -> Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, n, d), as PEFT runs it
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def prompts(self) -> Tensor:
        """P (n, d): the encoder's output; outside training cached until a parameter changes."""
        if not self.encode:
            return self.embedding.weight
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            self._cache = None
            return self._encode()
        stamp = tuple((id(p), p._version) for p in self.parameters())
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self._encode().detach())
        return self._cache[1]

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return embed_prompts(model, kwargs, self.num_virtual_tokens, self.prompts)

    def rewrite_encoder(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return embed_encoder_prompts(model, kwargs, self.prompts()[: self.num_virtual_tokens])

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        if for_save:
            with torch.no_grad():  # the inference path's output, bit for bit (LSTM kernels differ under autograd)
                return {"prompt_embeddings": self.prompts().detach()}
        if self.encode:
            raise NotImplementedError("a P-tuning file holds the encoder's output; it loads into an adapter built "
                                      "without the encoder (from_pretrained / load_adapter do that)")
        return {"prompt_embeddings": self.embedding.weight}
