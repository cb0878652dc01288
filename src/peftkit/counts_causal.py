"""Trainable-parameter counts of the causal-LM-only methods on a SmolLM2-135M config: measured and closed form.

CPT, Cartridge, LLaMA-Adapter V2, ShadowPEFT and X-LoRA need a decoder-only language model, so the RoBERTa-base table of
``docs/methods.md`` (``counts.py``) has no row for them; this second table applies each registry example of
theirs (and ShadowPEFT's peft defaults) to a Llama built from SmolLM2-135M's config on the meta device (30
layers, 576 wide, 9 query / 3 key-value heads, 1536-wide FFN, 49,152 tokens, tied embeddings: 134.5M
parameters). X-LoRA reads its LoRA experts from folders: two zero-valued experts of that shape (rank 4 and 2
on ``q_proj`` / ``v_proj``) are written to a temporary folder, and the base is allocated uninitialised
(``to_empty``: its weights are never read) because expert tensors cannot be copied into meta ones.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

from .functional import get_peft_model_state_dict
from .methods.lora import LoraConfig
from .model import get_peft_model
from .registry import MethodSpec, get_method

# counts.count (passed in by counts.methods_doc, which imports this module): spec, kwargs, model -> its row
Count = Callable[[MethodSpec, dict[str, Any], torch.nn.Module], dict[str, Any]]

METHODS = ("cpt", "cartridge", "llama_adapter_v2", "shadow", "xlora")
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0)
EXPERT_RANKS = (4, 2)
EXPERT_TARGETS = ["q_proj", "v_proj"]


def smollm2_135m(materialize: bool = False) -> torch.nn.Module:
    """SmolLM2-135M's architecture (LlamaForCausalLM) from its config, on the meta device (``materialize``:
    moved to uninitialised CPU storage)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, use_cache=False))
    if materialize:
        model = model.to_empty(device="cpu")
        model.tie_weights()  # to_empty unties lm_head from embed_tokens
    return model


def _write_experts(folder: str) -> dict[str, str]:
    """Zero-valued LoRA experts of SmolLM2-135M's shapes: {"0": path, "1": path}."""
    out = {}
    for i, r in enumerate(EXPERT_RANKS):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(EXPERT_TARGETS))
        tensors = get_peft_model_state_dict(get_peft_model(smollm2_135m(), config))
        path = os.path.join(folder, str(i))
        os.makedirs(path)
        save_file({k: torch.zeros(v.shape) for k, v in tensors.items()}, os.path.join(path, "adapter_model.safetensors"))
        config.save_pretrained(path)
        out[str(i)] = path
    return out


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, config) per row: every registry example of the four methods, and Shadow's defaults."""
    out = []
    for name in METHODS:
        spec = get_method(name)
        for label, kwargs in spec.examples:
            out.append((label, name, dict(kwargs)))
        if name == "shadow":
            out.append(("shadow (peft defaults)", name, {}))
    return out


def causal_rows(count: Count) -> list[dict[str, Any]]:
    """One row per case: measured trainable parameters on SmolLM2-135M and the registry's closed form
    (``count``: ``counts.count``)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftkit-counts-") as tmp:
        for label, name, kwargs in _cases():
            spec, shown, model = get_method(name), dict(kwargs), None
            kwargs["task_type"] = "CAUSAL_LM"
            if name == "xlora":
                kwargs.update(hidden_size=SMOLLM2["hidden_size"], adapters=_write_experts(tmp))
                shown.update(hidden_size=SMOLLM2["hidden_size"])
                shown["adapters"] = (f"{len(EXPERT_RANKS)} LoRA experts (r={'/'.join(map(str, EXPERT_RANKS))} on "
                                     f"{', '.join(EXPERT_TARGETS)})")
                model = smollm2_135m(materialize=True)
            if name == "shadow":
                with torch.device("meta"):  # its mirror backbone too: no random init of its weights
                    result = count(spec, kwargs, smollm2_135m())
            else:
                result = count(spec, kwargs, model if model is not None else smollm2_135m())
            rows.append({"example": label, "method": name, "config": shown, **result})
    return rows


def causal_doc(rows: list[dict[str, Any]], config_text: Callable[[dict[str, Any]], str]) -> str:
    """The second table of docs/methods.md (causal-LM-only methods on SmolLM2-135M)."""
    lines = [
        "Causal-LM-only methods (no RoBERTa row: they need a decoder-only LM), on a SmolLM2-135M config "
        "(LlamaForCausalLM, 30 layers x 576, 134.5M parameters, meta device):",
        "",
        "| example | method | config | modules | trainable (measured) | closed form | % of 134.5M |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| `{r['example']}` | `{r['method']}` | {config_text(r['config'])} | {r['targets']} | "
                     f"{r['trainable']:,d} | {r['closed_form']:,d} | {100 * r['trainable'] / r['total']:.3f}% |")
    return "\n".join(lines)
