#!/usr/bin/env python
"""Ladder side-tuning (LST) against LoRA on the real MiniLM: training memory.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_lst.py [--model minilm|vit] [--reps 5] [--json out.json]

Model: all-MiniLM-L6-v2 with a 2-label head (``peftkit.bench.grid.MODELS["minilm"]``), batch 16 x 64 tokens.
Configs: LST with ``reduction_factor=8`` (configs/sst2_lst.yaml: side width 48) and LoRA ``r=8, lora_alpha=16`` on
query / value (benchmarks/bench_methods.py's LoRA), both with the trained classifier head.

Two measures, each the median over ``--reps`` repetitions:
- activation bytes: the bytes of the distinct tensors autograd saves for backward during one training forward
  (``torch.autograd.graph.saved_tensors_hooks``; a storage saved twice counts once). This is the memory LST is
  designed to cut: its backbone runs without autograd and keeps no activations.
- RSS: a fresh subprocess per (method, repetition) builds the model, then trains 3 steps (forward, backward,
  AdamW) while a thread samples RSS every millisecond (bench_methods.py's ``child_memory`` pattern); reported are
  the peak RSS while training and its growth over the RSS after set-up.
Ratios are LST / LoRA.

``--model vit``: a ViT-Small-sized ``ViTForImageClassification`` built from a config with random weights (hidden
384, 12 blocks, 6 heads, FFN 1536, 224 x 224 images in 16 x 16 patches: 197 tokens, 10 labels), batch 8 (the
default there), the same two measures; LST with ``reduction_factor=8`` (side width 48) against LoRA ``r=8,
lora_alpha=16`` on ViT's query / value (``q_proj`` / ``v_proj`` in transformers 5), both training the classifier
(``modules_to_save``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

CONFIGS = {
    "lst": ("LSTConfig", {"reduction_factor": 8, "gate_temperature": 0.1}),
    "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}),
}
VIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224,
                 patch_size=16, num_labels=10)
VIT_CONFIGS = {"lst": CONFIGS["lst"],
               "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})}


def build(method: str, seed: int = 0, model_name: str = "minilm"):
    import torch

    import peftkit
    from peftkit.bench.grid import MODELS

    if model_name == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(seed)
        model = ViTForImageClassification(ViTConfig(**VIT_SMALL))
        cls_name, kwargs = VIT_CONFIGS[method]
        config = getattr(peftkit, cls_name)(modules_to_save=["classifier"], **kwargs)
        return peftkit.get_peft_model(model, config).train()
    model = MODELS["minilm"].build(seed)
    torch.manual_seed(seed)
    cls_name, kwargs = CONFIGS[method]
    return peftkit.get_peft_model(model, getattr(peftkit, cls_name)(task_type="SEQ_CLS", **kwargs)).train()


def _batch(model, a):
    if a.model == "vit":
        import torch

        g = torch.Generator().manual_seed(0)
        size = VIT_SMALL["image_size"]
        return {"pixel_values": torch.randn(a.batch, 3, size, size, generator=g),
                "labels": torch.randint(0, VIT_SMALL["num_labels"], (a.batch,), generator=g)}
    from peftkit.bench.grid import MODELS

    return MODELS["minilm"].batch(model, a.batch, a.seq)


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves during one training forward (then backward runs)."""
    import torch

    seen: dict[tuple, int] = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def child_memory(a) -> dict:
    """RSS after set-up, and the peak RSS while training 3 steps (sampled every millisecond)."""
    import torch

    from peftkit.bench import measure as M

    torch.set_num_threads(a.threads)
    model = build(a._method, model_name=a.model)
    opt = M.make_optimizer(model)
    batch = _batch(model, a)
    return U.rss_during(lambda: [M.train_step(model, opt, batch) for _ in range(3)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model", choices=("minilm", "vit"), default="minilm")
    p.add_argument("--batch", type=int, default=None, help="16 (minilm) / 8 (vit)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_method", default="lst", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.batch = a.batch or (8 if a.model == "vit" else 16)
    if a._child:
        U.emit_result(child_memory(a))
        return 0
    import torch

    torch.set_num_threads(a.threads)
    vit = a.model == "vit"
    configs = VIT_CONFIGS if vit else CONFIGS
    out: dict = {"model": "ViT-Small-sized ViTForImageClassification (random weights) + 10-label head" if vit else
                 "all-MiniLM-L6-v2 + 2-label head", "batch": a.batch, "seq": 197 if vit else a.seq, "reps": a.reps,
                 "configs": {m: kw for m, (_, kw) in configs.items()}, "methods": {}}
    for method in configs:
        model = build(method, model_name=a.model)
        batch = _batch(model, a)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        act = [saved_bytes(model, batch) for _ in range(a.reps)]
        del model
        rss = []
        for _ in range(a.reps):
            args = ["--_child", "--_method", method, "--model", a.model, "--batch", str(a.batch), "--seq",
                    str(a.seq), "--threads", str(a.threads)]
            rss.append(U.run_child(os.path.abspath(__file__), args))
        out["methods"][method] = {
            "trainable": trainable,
            "activation_mb": statistics.median(act) / 2**20,
            "train_peak_mb": statistics.median(r["train_peak_mb"] for r in rss),
            "growth_mb": statistics.median(r["train_peak_mb"] - r["setup_mb"] for r in rss),
        }
    lst, lora = out["methods"]["lst"], out["methods"]["lora"]
    out["ratio_lst_over_lora"] = {k: lst[k] / lora[k] for k in ("activation_mb", "train_peak_mb", "growth_mb")}
    print(f"{'method':8} {'trainable':>10} {'activations MB':>15} {'peak RSS MB':>12} {'RSS growth MB':>14}")
    for m, r in out["methods"].items():
        print(f"{m:8} {r['trainable']:>10,d} {r['activation_mb']:>15.1f} {r['train_peak_mb']:>12.1f} "
              f"{r['growth_mb']:>14.1f}")
    print("LST / LoRA: " + ", ".join(f"{k} {v:.3f}" for k, v in out["ratio_lst_over_lora"].items()))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
