"""The pieces of the text-to-image tasks' models: the tiny UNet (``unet-tiny``), a UNet from a folder, the frozen
prompt encoder (built over the prompts' words, or the one a base model was saved with) and the DDIM sampler.
:mod:`peftkit.train.diffusion` (the task) and :mod:`peftkit.train.unet_digits` (the pre-trained base) use them."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from .data import DataError
from .packages import ModelError

TOKENIZER_FILE = "tokenizer.json"  # a saved prompt encoder's word-level tokenizer (beside text_encoder/)
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prompt_for(label: str) -> str:
    """The text prompt of a class name: "3" -> "a photo of the digit three", "Ankle boot" -> "a photo of a
    ankle boot"."""
    if label.isdigit() and int(label) < len(NUMBER_WORDS):
        return f"a photo of the digit {NUMBER_WORDS[int(label)]}"
    return f"a photo of a {label.lower().replace('/', ' or ')}"


def unet_tiny(image_size: int = 16, channels: int = 1, cross_attention_dim: int = 32) -> nn.Module:
    """A 200k-parameter UNet2DConditionModel (two levels, cross-attention at the outer one), seed-0 weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=8, norm_num_groups=8)


def load_unet(name: str) -> nn.Module:
    """A UNet2DConditionModel from a folder (its own, or a pipeline folder's ``unet/``)."""
    from diffusers import UNet2DConditionModel

    if not os.path.isdir(name):
        raise ModelError(f"model: {name!r} is neither unet-tiny, unet-tiny-digits nor a folder holding a "
                         "UNet2DConditionModel")
    sub = "unet" if os.path.isfile(os.path.join(name, "unet", "config.json")) else None
    return UNet2DConditionModel.from_pretrained(name, subfolder=sub)


class PromptEncoder:
    """A frozen tiny CLIP text encoder over a word-level vocabulary of ``prompts``' words."""

    def __init__(self, prompts: list[str], hidden_size: int, length: int | None = None) -> None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import Whitespace
        from transformers import CLIPTextConfig, CLIPTextModel

        words = sorted({w for p in prompts for w in p.split()})
        vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
        self.tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        self.tokenizer.pre_tokenizer = Whitespace()
        self.length = length or max(len(p.split()) for p in prompts) + 1  # + [EOS]
        config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=self.length,
                                pad_token_id=0, eos_token_id=2, bos_token_id=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = CLIPTextModel(config).eval().requires_grad_(False)

    @classmethod
    def saved(cls, folder: str, prompts: list[str]) -> "PromptEncoder":
        """The encoder a base model was trained with (``folder/tokenizer.json``, ``folder/text_encoder/``; its
        length is the text encoder's ``max_position_embeddings``), plus ``prompts``' words it lacks: each an added
        token whose embedding row is drawn from N(0, 0.02^2) by a seed-0 generator (in sorted order), so the same
        prompts give the same encoder. A prompt longer than the length is a DataError."""
        from tokenizers import AddedToken, Tokenizer
        from transformers import CLIPTextModel

        self = cls.__new__(cls)
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
        self.model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval().requires_grad_(False)
        self.length = int(self.model.config.max_position_embeddings)
        long = [p for p in prompts if len(p.split()) + 1 > self.length]
        if long:
            raise DataError(f"prompt {long[0]!r}: {folder}'s text encoder reads at most {self.length - 1} words")
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        new = sorted({w for p in prompts for w in p.split()} - set(vocab))
        if new:
            self.tokenizer.add_tokens([AddedToken(w, single_word=True) for w in new])
            emb = self.model.get_input_embeddings().weight
            rows = torch.randn((len(new), emb.shape[1]), generator=torch.Generator().manual_seed(0)) * 0.02
            grown = torch.cat([emb.detach(), rows.to(emb.dtype)])
            self.model.resize_token_embeddings(len(grown), mean_resizing=False)
            self.model.get_input_embeddings().weight.data.copy_(grown)
        return self

    def save(self, folder: str) -> None:
        """Write ``folder/tokenizer.json`` and ``folder/text_encoder/`` (what :meth:`saved` reads)."""
        self.tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
        self.model.save_pretrained(os.path.join(folder, "text_encoder"))

    def ids(self, prompts: list[str]) -> Tensor:
        rows = []
        for p in prompts:
            ids = self.tokenizer.encode(p).ids + [2]
            rows.append(ids + [0] * (self.length - len(ids)))
        return torch.tensor(rows)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        """(len(prompts), length, hidden_size) last hidden states."""
        return self.model(input_ids=self.ids(prompts)).last_hidden_state


@torch.no_grad()
def sample_images(unet: nn.Module, cond: Tensor, shape: tuple[int, ...], *, steps: int = 20, seed: int = 0,
                  scheduler_config: dict[str, Any] | None = None) -> Tensor:
    """DDIM samples (eta 0, ``steps`` steps) in [-1, 1], one per row of ``cond``; the start noise comes
    from a generator seeded with ``seed``, so equal UNets give equal samples."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**(scheduler_config or SCHEDULER))
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    x = torch.randn((len(cond), *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    cond = cond.to(device)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        eps = unet(x, t.to(device), encoder_hidden_states=cond).sample
        x = scheduler.step(eps, t, x).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1).cpu()


def has_prompt_encoder(folder: str | None) -> bool:
    """Whether a model folder holds the prompt encoder its UNet was trained with."""
    return bool(folder) and os.path.isfile(os.path.join(folder, TOKENIZER_FILE)) and os.path.isfile(
        os.path.join(folder, "text_encoder", "config.json"))
