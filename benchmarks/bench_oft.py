#!/usr/bin/env python
"""OFT / BOFT training-step time, peftkit vs Hugging Face peft, in one process.

A BertModel of MiniLM's shape (hidden 384, 6 layers, 12 heads, FFN 1536; random weights), batch 16 x 64
tokens, adapters on query and value, SGD. One step = forward + backward + optimizer step; each
repetition runs every configuration once (order rotated), the table shows medians over repetitions.
"base" is the frozen model with a backward through all of it (the embedding output requires grad) and
no adapter: the floor both libraries share, so ``overhead = step - base`` is the adapter's own cost.

A second table isolates one targeted layer (Linear 384 -> 384, 1024 tokens, forward + backward with the
input requiring grad, median of ``--layer-reps``): the adapter's cost without the frozen model around it,
which a loaded machine's noise on a whole step (tens of ms) would otherwise hide.

Times are the calling thread's CPU time (``time.thread_time``; with one torch thread, forward and backward
both run on it), which other processes on a shared machine disturb far less than wall-clock time; the
wall-clock medians are printed too.

  .venv/bin/python benchmarks/bench_oft.py [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layer-reps", type=int, default=30)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import peft
    from transformers import BertConfig, BertModel

    import peftkit

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         vocab_size=30522, max_position_embeddings=512)
        return BertModel(cfg).train()

    ids = torch.randint(0, 30522, (args.batch, args.seq))
    targets = ["query", "value"]

    def base() -> torch.nn.Module:
        m = model().requires_grad_(False)
        m.embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_())
        return m

    configs = {
        "base": base,
        "OFT  peft": lambda: peft.get_peft_model(model(), peft.OFTConfig(target_modules=targets)),
        "OFT  ours": lambda: peftkit.get_peft_model(model(), peftkit.OFTConfig(target_modules=targets)),
        "BOFT peft": lambda: peft.get_peft_model(model(), peft.BOFTConfig(target_modules=targets)),
        "BOFT ours": lambda: peftkit.get_peft_model(model(), peftkit.BOFTConfig(target_modules=targets)),
    }
    models = {name: make() for name, make in configs.items()}
    optims = {name: torch.optim.SGD(params, lr=1e-4) if (params := [p for p in m.parameters() if p.requires_grad])
              else None for name, m in models.items()}

    def step(name: str) -> tuple[float, float]:
        m, opt = models[name], optims[name]
        start, cpu = time.perf_counter(), time.thread_time()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        m(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        if opt is not None:
            opt.step()
        return time.thread_time() - cpu, time.perf_counter() - start

    names = list(models)
    for name in names:  # warm-up
        step(name)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(step(name))
    cpu = {n: statistics.median(c for c, _ in t) for n, t in times.items()}
    cpu_min = {n: min(c for c, _ in t) for n, t in times.items()}
    wall = {n: statistics.median(w for _, w in t) for n, t in times.items()}
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch} x {args.seq}, "
          f"median of {args.reps}")
    print(f"{'config':<10} {'cpu ms':>9} {'overhead':>9} {'wall ms':>9} {'overhead':>9}")
    for n in names:
        print(f"{n:<10} {cpu[n] * 1e3:9.1f} {(cpu[n] - cpu['base']) * 1e3:9.1f} "
              f"{wall[n] * 1e3:9.1f} {(wall[n] - wall['base']) * 1e3:9.1f}")
    for method in ("OFT ", "BOFT"):
        for label, med in (("cpu", cpu), ("cpu min", cpu_min), ("wall", wall)):
            ours, theirs, b = med[f"{method} ours"], med[f"{method} peft"], med["base"]
            print(f"{method.strip():<5} ours/peft ({label:>7}): step {ours / theirs:.2f}, adapter overhead "
                  f"{(ours - b) / (theirs - b):.2f}")


def layer_table(args: argparse.Namespace) -> None:
    import peft
    from torch import nn

    import peftkit

    torch.manual_seed(0)
    lin = nn.Linear(384, 384)
    x0 = torch.randn(args.batch, args.seq, 384)
    g0 = torch.randn(args.batch, args.seq, 384)

    def wrap(lib, cfg) -> nn.Module:
        return lib.get_peft_model(nn.Sequential(lin), cfg).train()

    layers = {
        "plain": nn.Sequential(lin).requires_grad_(False),
        "OFT  peft": wrap(peft, peft.OFTConfig(target_modules=["0"])),
        "OFT  ours": wrap(peftkit, peftkit.OFTConfig(target_modules=["0"])),
        "BOFT peft": wrap(peft, peft.BOFTConfig(target_modules=["0"])),
        "BOFT ours": wrap(peftkit, peftkit.BOFTConfig(target_modules=["0"])),
    }

    def step(m: nn.Module) -> float:
        x = x0.clone().requires_grad_(True)
        start = time.thread_time()
        m(x).backward(g0)
        return time.thread_time() - start

    times: dict[str, list[float]] = {n: [] for n in layers}
    for m in layers.values():
        step(m)
    for _ in range(args.layer_reps):
        for name, m in layers.items():
            times[name].append(step(m))
    med = {n: statistics.median(t) for n, t in times.items()}
    tokens = args.batch * args.seq
    print(f"\none layer, Linear 384 -> 384, {tokens} tokens, fwd + bwd, median of {args.layer_reps}")
    print(f"{'config':<10} {'cpu ms':>9} {'overhead':>9}")
    for n in layers:
        print(f"{n:<10} {med[n] * 1e3:9.2f} {(med[n] - med['plain']) * 1e3:9.2f}")
    for method in ("OFT ", "BOFT"):
        ours, theirs, b = med[f"{method} ours"], med[f"{method} peft"], med["plain"]
        print(f"{method.strip():<5} ours/peft: layer {ours / theirs:.2f}, adapter overhead {(ours - b) / (theirs - b):.2f}")


if __name__ == "__main__":
    main()
    layer_table(parse_args())
