#!/usr/bin/env python
"""Trainable tokens: training-step time and adapter file size, peftkit vs Hugging Face peft, in one process.

A tiny Llama (vocabulary ``--vocab``, 2,000 by default; 32,000 is Llama 2's and shows the per-step cost of
peft's whole-vocabulary copy and dense gradient; hidden 256, 2 layers, 4 heads, FFN 688; random weights), 16
trainable tokens (``TrainableTokensConfig``, the input embedding; ``--tie``: embeddings tied to the LM head), batch 8 x 64
tokens, AdamW. One step = forward + backward + optimizer step. Each repetition times ``--steps`` steps of
each library, the libraries interleaved (order alternating); the table shows the median over ``--reps``
repetitions of the per-step time (the calling thread's CPU time, ``time.thread_time``, which other processes
on a shared machine disturb far less than wall-clock time; wall-clock medians printed too) and the size of
``adapter_model.safetensors`` after ``save_pretrained``.

  .venv/bin/python benchmarks/bench_trainable_tokens.py [--reps 7] [--steps 10] [--threads 1] [--tie] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB, HIDDEN, TOKENS = 2000, 256, list(range(1000, 2000, 63))[:16]


def build(tie: bool, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    args = ap.parse_args()
    assert args.reps >= 5, "at least 5 repetitions"
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import peft

    import peftkit

    assert "peftkit" not in (peft.__file__ or ""), "the real peft package is needed as the reference"
    assert len(TOKENS) == 16
    models = {
        "peft": peft.get_peft_model(build(args.tie, args.vocab), peft.TrainableTokensConfig(token_indices=TOKENS)),
        "ours": peftkit.get_peft_model(build(args.tie, args.vocab), peftkit.TrainableTokensConfig(token_indices=TOKENS)),
    }
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    ids[:, ::4] = torch.tensor(TOKENS).repeat(args.seq // 4 // 16 + 1)[: (args.seq + 3) // 4]  # chosen tokens in use
    opts = {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in params) == 16 * HIDDEN, (name, sum(p.numel() for p in params))
        opts[name] = torch.optim.AdamW(params, lr=1e-3)

    def step(name: str) -> None:
        out = models[name](input_ids=ids, labels=ids)
        out.loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in models:  # warm-up
        for _ in range(3):
            step(name)
    cpu: dict[str, list[float]] = {n: [] for n in models}
    wall: dict[str, list[float]] = {n: [] for n in models}
    for rep in range(args.reps):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(args.steps):
                step(name)
            cpu[name].append((time.thread_time() - c0) / args.steps)
            wall[name].append((time.perf_counter() - w0) / args.steps)

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            model.save_pretrained(os.path.join(tmp, name))
            sizes[name] = os.path.getsize(os.path.join(tmp, name, "adapter_model.safetensors"))

    med = {n: statistics.median(v) for n, v in cpu.items()}
    medw = {n: statistics.median(v) for n, v in wall.items()}
    print(f"tiny Llama vocab {args.vocab}, hidden {HIDDEN}, 2 layers, 16 trainable tokens, tie={args.tie}, "
          f"batch {args.batch} x {args.seq}, {args.threads} thread(s), median of {args.reps} x {args.steps} steps")
    print(f"{'':8}{'step ms (cpu)':>15}{'step ms (wall)':>16}{'file bytes':>12}")
    for name in models:
        print(f"{name:8}{med[name] * 1e3:15.2f}{medw[name] * 1e3:16.2f}{sizes[name]:12d}")
    print(f"ratio ours/peft: step {med['ours'] / med['peft']:.3f}x (cpu), {medw['ours'] / medw['peft']:.3f}x (wall); "
          f"file {sizes['ours'] / sizes['peft']:.3f}x")


if __name__ == "__main__":
    main()
