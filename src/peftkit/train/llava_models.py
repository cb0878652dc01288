"""LLaVA models for ``peftkit train`` (task ``image_caption``): a tiny one built from configs, and one composed
of real pre-trained pieces, cached under ``$PEFTKIT_CACHE``.

- ``llava-tiny``: :func:`peftkit.tiny_models.llava` at width 64 (a 2-layer CLIP vision tower on 16 px images,
  4 px patches: 16 image tokens; a fresh 2-layer projector; a 2-layer Llama LM), fixed random weights (seed
  0), with the MiniLM's WordPiece tokenizer plus an ``<image>`` token. Built in memory in well under a second.
- ``llava-smollm2``: the vision tower of ``clip-tiny-digits`` (pre-trained on digits,
  :mod:`peftkit.train.clip_tiny`), a new randomly initialised projector (seed 0) and SmolLM2-135M-Instruct
  (:func:`peftkit.train.packages.smollm2_dir`) with an ``<image>`` token added to its tokenizer and its
  (tied) embedding. Composed once into a ``transformers`` LLaVA folder (about 20 s the first time, plus
  the two pieces' own first builds) and reused; the folder carries ``clip-tiny-digits``' pre-training
  record (``peftkit_pretrain.json``: which digit images its vision tower saw; none of the digits test split).

Both take the vision tower's last layer's patch features (``vision_feature_layer=-1``: the towers have 2
layers) without the CLS token (LLaVA's ``default`` strategy).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import tiny_models
from .build_cache import PRETRAIN_RECORD, cache_root, publish
from .clip_tiny import clip_tiny_digits_dir, clip_tiny_digits_path
from .packages import ModelError, minilm_dir, smollm2_dir
from .task import quiet_transformers

IMAGE_TOKEN = "<image>"
LLAVA_TINY = "llava-tiny"
LLAVA_SMOLLM2 = "llava-smollm2"
LLAVA_SMOLLM2_VERSION = 1  # bump when the composition changes: the cache folder's name changes with it
TINY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def with_image_token(tokenizer: Any) -> int:
    """Add ``<image>`` to ``tokenizer`` (when missing) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def tiny_tokenizer() -> Any:
    """The MiniLM's WordPiece tokenizer with an ``<image>`` token (the last id)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    with_image_token(tok)
    return tok


def llava_tiny(tokenizer: Any, image_size: int = 16) -> nn.Module:
    """``llava-tiny`` for ``tokenizer`` (with its ``<image>`` token); weights a fixed function of the shape."""
    text = dict(TINY_WIDTH, vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=128,
                initializer_range=0.3,  # wide logits: a trained projector or norm can move the answer
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                bos_token_id=tokenizer.cls_token_id)
    vision = dict(TINY_WIDTH, image_size=image_size, patch_size=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny_models.llava(text=text, vision=vision, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def image_tokens(config: Any) -> int:
    """How many ``<image>`` tokens one image takes in a LLaVA model of ``config`` (as its processor counts)."""
    v = config.vision_config
    size, patch = v.image_size, v.patch_size
    n = (size // patch) * (size // patch)
    return n + 1 if config.vision_feature_select_strategy == "full" else n


# ------------------------------------------------------------------------------------ llava-smollm2
def llava_smollm2_path() -> Path:
    clip = clip_tiny_digits_path()
    key = hashlib.sha256(f"{LLAVA_SMOLLM2_VERSION}:{clip.name}".encode()).hexdigest()[:12]
    return cache_root() / f"{LLAVA_SMOLLM2}-{key}"


def _is_built(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()


def compose_llava(clip_dir: str, lm_dir: str) -> tuple[nn.Module, Any]:
    """A LLaVA of the CLIP folder's vision tower, a fresh projector (seed 0) and the causal LM folder's model,
    with ``<image>`` added to the LM's tokenizer and embedding; returns (model, tokenizer)."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPModel, LlavaConfig,
                              LlavaForConditionalGeneration)

    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    vocab = lm.config.vocab_size
    image_id = with_image_token(tok)
    text_config = lm.config.to_dict()
    text_config["vocab_size"] = max(vocab, len(tok))
    config = LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=text_config,
                         image_token_id=image_id, vision_feature_layer=-1,
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict())  # strict
    state = lm.model.state_dict()
    emb = model.model.language_model.embed_tokens.weight
    grown = state["embed_tokens.weight"]
    if emb.shape[0] > grown.shape[0]:  # the new <image> row: the mean row (LLaVA overwrites it with features)
        extra = grown.mean(0, keepdim=True).expand(emb.shape[0] - grown.shape[0], -1)
        state["embed_tokens.weight"] = torch.cat([grown, extra])
    model.model.language_model.load_state_dict(state)
    if not lm.config.tie_word_embeddings:
        head = lm.lm_head.weight.detach()
        rows = torch.cat([head, head.mean(0, keepdim=True).expand(emb.shape[0] - head.shape[0], -1)])
        model.lm_head.weight.data.copy_(rows)
    elif model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model.eval(), tok


def llava_smollm2_dir() -> str:
    """The folder of ``llava-smollm2``, composed on first use and reused afterwards."""
    folder = llava_smollm2_path()
    if _is_built(folder):
        return str(folder)
    quiet_transformers()
    clip_dir, lm_dir = clip_tiny_digits_dir(), smollm2_dir()
    model, tok = compose_llava(clip_dir, lm_dir)
    record = json.loads((Path(clip_dir) / PRETRAIN_RECORD).read_text(encoding="utf-8"))
    record["vision_tower_of"] = LLAVA_SMOLLM2
    publish(folder, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)), record, _is_built)
    return str(folder)


def load_llava(folder: str) -> tuple[nn.Module, Any]:
    """A local LLaVA folder's model (float32) and tokenizer; a folder of another architecture is a ModelError."""
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llava":
        raise ModelError(f"model: {folder} is a {config.model_type!r} model; task image_caption needs a LLaVA "
                         f"model ({LLAVA_TINY}, {LLAVA_SMOLLM2} or a LlavaForConditionalGeneration folder)")
    return (LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder))
