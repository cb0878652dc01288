"""Predicted peak memory of a PEFT training run, before loading anything (``peftkit estimate``).

The model is built on the meta device from its config (no weights are read) and the adapter is attached
there, so the parameter counts are exact. The parts of the peak, in MB (2**20 bytes):

- ``weights``: the frozen base (fp32; with ``quant="4bit"`` every quantized Linear takes 4 bits per weight
  plus its block scales: one byte per 64 weights with double quantization, 8 bits plus a row scale for 8-bit).
- ``adapter``: the trainable parameters (fp32), ``gradients`` the same again, ``optimizer`` AdamW's two
  moments plus one parameter-sized temporary of its foreach update.
- ``activations``: what autograd keeps for the backward of one step, per layer ``c_h t h + c_f t f + c_s b a s^2``
  (t = batch x seq tokens, h hidden, f intermediate, a heads) plus the language-model head's logits; a 4-bit
  base adds the fp32 copy of its largest layer that the dequantizing matmul makes.
- ``runtime``: the Python process with torch, transformers, peftkit and bitsandbytes imported plus the
  workspaces of the first training step (measured on the machine where the coefficients were set;
  ``runtime_mb=`` overrides it).

The coefficients come from counting the tensors saved by each op (benchmarks/bench_estimate.py compares the
prediction with the peak RSS of real runs; docs/bench_quant.md has the table).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from .layers import adapter_layers
from .model import get_peft_model
from .registry import get_method
from .train.models import BUILTIN, resolve_model

MB = 2**20
RUNTIME_MB = 410.0  # imports (torch, transformers, peftkit, bitsandbytes: 360) + first-step workspaces (50), here
# autograd's saved tensors per transformer layer, in units of (tokens x width x 4 bytes); see module docstring
_COEF = {
    "llama": {"h": 13.0, "f": 4.5, "s": 1.0},  # RMSNorm x2, q/k/v/rope/attn out, SiLU gate/up/product
    "bert": {"h": 12.0, "f": 3.0, "s": 4.5},  # LayerNorm x2, q/k/v/context, GELU; attention probs + dropout
}
CONFIGS: dict[str, dict[str, Any]] = {  # config names accepted instead of a model (built from scratch)
    "llama-tiny": dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "llama-small": dict(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1408,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "llama-160m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "llama-1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32),
}


def load_config(model: str) -> Any:
    """A transformers config for a built-in name (minilm, smollm2), a local folder or a name in CONFIGS."""
    from transformers import AutoConfig

    if model in CONFIGS:
        spec = dict(CONFIGS[model])
        return AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=2048, **spec)

    text = sorted(k for k in BUILTIN if not k.startswith("clip"))  # the estimate covers language models
    if model not in text and not _is_dir(model):
        raise ValueError(f"estimate: unknown model {model!r}; expected one of {text}, "
                         f"{sorted(CONFIGS)} or a local folder of a language model")
    return AutoConfig.from_pretrained(resolve_model(model))


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def is_causal(config: Any) -> bool:
    return config.model_type not in ("bert", "roberta", "distilbert", "deberta-v2", "electra")


def meta_model(config: Any, num_labels: int = 2) -> nn.Module:
    """The model for ``config`` on the meta device: the task head ``peftkit train`` would use."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if is_causal(config):
            return AutoModelForCausalLM.from_config(config)
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(config)


def _quantizable(name: str, module: nn.Module) -> bool:
    """Mirrors quant.quantize_model's defaults (heads kept; 4-bit rows a multiple of 64 wide)."""
    head = name.rsplit(".", 1)[-1] in ("lm_head", "classifier", "score")
    return type(module) is nn.Linear and not head and module.in_features % 64 == 0


def weight_bytes(model: nn.Module, quant: str | None) -> tuple[int, int]:
    """(bytes of the frozen base, numel of its largest quantized Linear, sum of their output widths)."""
    total, largest, widths, seen = 0, 0, 0, set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if quant and pname == "weight" and _quantizable(name, module):
                largest = max(largest, p.numel())
                widths += module.out_features
                total += p.numel() // 2 + p.numel() // 64 if quant == "4bit" else p.numel() + 4 * p.shape[0]
            else:
                total += p.numel() * p.element_size()
    return total, largest, widths


def estimate(
    model: str | Any, method: str = "lora", r: int = 16, batch: int = 8, seq: int = 128,
    quant: str | None = None, target_modules: Any = "all-linear", runtime_mb: float | None = None,
) -> dict[str, Any]:
    """Predicted peak training memory: ``{"predicted_peak_mb": ..., "parts": {part: MB}}`` (see module doc)."""

    if quant not in (None, "4bit", "8bit"):
        raise ValueError(f"estimate: quant={quant!r}; expected None, '4bit' or '8bit'")
    config = load_config(model) if isinstance(model, str) else model
    base = meta_model(config)
    causal = is_causal(config)
    weights, largest, _ = weight_bytes(base, quant)
    cfg_cls = get_method(method).config_cls
    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM" if causal else "SEQ_CLS"}
    if method == "lora":
        kwargs.update(r=r, lora_alpha=2 * r, target_modules=target_modules)
    elif target_modules is not None:
        kwargs["target_modules"] = target_modules
    peft_model = get_peft_model(base, cfg_cls(**kwargs))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # the 4-bit surcharge below applies to quantized layers that carry an adapter (the others run plainly)
    widths = sum(layer.base_layer.out_features for path, layer in adapter_layers(peft_model)
                 if _quantizable(path, layer.base_layer))
    h, layers = config.hidden_size, config.num_hidden_layers
    f = config.intermediate_size
    heads = config.num_attention_heads
    t = batch * seq
    coef = _COEF["llama" if causal else "bert"]
    act = layers * (coef["h"] * t * h + coef["f"] * t * f + coef["s"] * batch * heads * seq * seq) * 4
    act += (3 * t * config.vocab_size * 4) if causal else 4 * t * h * 4  # logits, log-softmax, their grad
    act += 2 * t * r * 4 * layers * 7  # LoRA's (t x r) intermediates
    if quant:
        # the dequantized fp32 weight (and its transpose) inside the matmul, and the quantized layer's own
        # output next to the adapter's sum (no fused in-place accumulation): 1.75 floats per adapted output
        act += 2 * largest * 4 + 1.75 * t * widths * 4
    parts = {
        "weights": weights / MB,
        "adapter": trainable * 4 / MB,
        "gradients": trainable * 4 / MB,
        "optimizer": trainable * 12 / MB,
        "activations": act / MB,
        "runtime": RUNTIME_MB if runtime_mb is None else runtime_mb,
    }
    parts = {k: round(v, 1) for k, v in parts.items()}
    return {"predicted_peak_mb": round(sum(parts.values()), 1), "parts": parts, "trainable_params": trainable,
            "config": {"model": model if isinstance(model, str) else config.model_type, "method": method, "r": r,
                       "batch": batch, "seq": seq, "quant": quant}}


def format_estimate(result: dict[str, Any], as_json: bool = False) -> str:
    if as_json:
        return json.dumps({"predicted_peak_mb": result["predicted_peak_mb"], "parts": result["parts"]})
    lines = [f"predicted peak training memory: {result['predicted_peak_mb']:.0f} MB "
             f"({result['trainable_params']:,d} trainable parameters)"]
    lines += [f"  {k:<12}{v:>10.1f} MB" for k, v in result["parts"].items()]
    return "\n".join(lines)


def _cmd_estimate(args: Any) -> int:
    import sys

    quant = None if args.quant in (None, "none") else args.quant
    targets = args.targets.split(",") if "," in args.targets else args.targets
    try:
        result = estimate(args.model, args.method, r=args.r, batch=args.batch, seq=args.seq, quant=quant,
                          target_modules=targets, runtime_mb=args.runtime_mb)
    except (ValueError, OSError) as exc:
        print(f"peftkit estimate: {exc}", file=sys.stderr)
        return 2
    print(format_estimate(result, args.json))
    return 0


def add_parser(sub: Any) -> None:
    """``peftkit estimate MODEL --method lora --r 16 --batch B --seq S [--quant 4bit] [--json]``."""
    p = sub.add_parser("estimate", help="predict the peak memory of a PEFT training run (nothing is loaded)")
    p.add_argument("model", help=f"built-in name (minilm, smollm2), a local model folder, or {', '.join(CONFIGS)}")
    p.add_argument("--method", default="lora")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--quant", choices=["none", "4bit", "8bit"], default=None, help="quantized base (peftkit.quant)")
    p.add_argument("--targets", default="all-linear", help="target_modules: all-linear (default) or a,b,c")
    p.add_argument("--runtime-mb", type=float, default=None, help="process baseline (default: measured here)")
    p.add_argument("--json", action="store_true", help='print {"predicted_peak_mb": ..., "parts": {...}}')
    p.set_defaults(run=_cmd_estimate)
