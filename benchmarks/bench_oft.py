#!/usr/bin/env python
"""OFT / BOFT training-step time, peftkit vs Hugging Face peft, in one process, against the floor.

A BertModel of MiniLM's shape (hidden 384, 6 layers, 12 heads, FFN 1536; random weights), batch 16 x 64
tokens, adapters on query and value (``--targets all-linear``: every Linear), SGD. One step = forward +
backward + optimizer step; each repetition runs every configuration once (order rotated), the table shows
medians over repetitions. Configurations:

- ``floor``: the same model frozen, with one trainable scalar multiplying the embedding output, so the
  backward runs through the whole model for input gradients only. Every adapter that sits inside the
  model pays at least this (its forward, and the input gradients of every layer below an adapter); so
  ``ours / peft >= floor / peft`` for any implementation: a step-time target below that is out of reach.
- ``LoRA peft`` (r=8, alpha=16): a reference adapter cost on the same targets.
- ``OFT peft`` / ``OFT ours`` (block size 32, Neumann series, the peft defaults) and BOFT (``--no-boft``
  skips it: peft's BOFT takes seconds per step on CPU).

``overhead = step - floor`` is the adapter's own cost. A second table isolates single layers (Linear
384 -> 384, 384 -> 1536 and 1536 -> 384, 1024 tokens, forward + backward with the input requiring grad,
median of ``--layer-reps``), where a loaded machine's noise on a whole step would otherwise hide it.

Times are the calling thread's CPU time (``time.thread_time``; with one torch thread, forward and backward
both run on it), which other processes on a shared machine disturb far less than wall-clock time; the
wall-clock medians are printed too.

  .venv/bin/python benchmarks/bench_oft.py [--reps 7] [--threads 1] [--targets qv|all-linear] [--batch 8]
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
    p.add_argument("--targets", choices=("qv", "all-linear"), default="qv")
    p.add_argument("--no-boft", action="store_true", help="skip BOFT (peft's takes seconds per step on CPU)")
    p.add_argument("--no-layers", action="store_true", help="skip the single-layer table")
    p.add_argument("--json", help="write the medians and raw samples here")
    return p.parse_args()


def main(args: argparse.Namespace) -> dict:
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
    targets = ["query", "value"] if args.targets == "qv" else "all-linear"

    def floor() -> torch.nn.Module:
        m = model().requires_grad_(False)
        m.input_scale = torch.nn.Parameter(torch.ones(()))  # the one trainable parameter, at the input
        m.embeddings.register_forward_hook(lambda mod, args, out: out * m.input_scale)
        return m

    configs = {
        "floor": floor,
        "LoRA peft": lambda: peft.get_peft_model(model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)),
        "OFT  peft": lambda: peft.get_peft_model(model(), peft.OFTConfig(target_modules=targets)),
        "OFT  ours": lambda: peftkit.get_peft_model(model(), peftkit.OFTConfig(target_modules=targets)),
    }
    if not args.no_boft:
        configs["BOFT peft"] = lambda: peft.get_peft_model(model(), peft.BOFTConfig(target_modules=targets))
        configs["BOFT ours"] = lambda: peftkit.get_peft_model(model(), peftkit.BOFTConfig(target_modules=targets))
    models = {name: make() for name, make in configs.items()}
    optims = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4)
              for name, m in models.items()}

    def step(name: str) -> tuple[float, float]:
        m, opt = models[name], optims[name]
        start, cpu = time.perf_counter(), time.thread_time()
        opt.zero_grad(set_to_none=True)
        m(input_ids=ids).last_hidden_state.pow(2).mean().backward()
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
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch} x {args.seq}, targets "
          f"{args.targets}, median of {args.reps}")
    print(f"{'config':<10} {'cpu ms':>9} {'overhead':>9} {'wall ms':>9} {'overhead':>9}")
    for n in names:
        print(f"{n:<10} {cpu[n] * 1e3:9.1f} {(cpu[n] - cpu['floor']) * 1e3:9.1f} "
              f"{wall[n] * 1e3:9.1f} {(wall[n] - wall['floor']) * 1e3:9.1f}")
    summary = {}
    for method in ("OFT ", "BOFT")[: 1 if args.no_boft else 2]:
        for label, med in (("cpu", cpu), ("cpu min", cpu_min), ("wall", wall)):
            ours, theirs, b = med[f"{method} ours"], med[f"{method} peft"], med["floor"]
            print(f"{method.strip():<5} ours/peft ({label:>7}): step {ours / theirs:.3f}, adapter overhead "
                  f"{(ours - b) / (theirs - b):.2f}; floor / peft {b / theirs:.3f} (no implementation can go below)")
            summary[f"{method.strip()} {label}"] = {"ours_over_peft": ours / theirs, "floor_over_peft": b / theirs,
                                                    "peft_over_floor": theirs / b,
                                                    "overhead_ratio": (ours - b) / (theirs - b)}
    b, oft = cpu["floor"], cpu["OFT  peft"]
    print(f"peft OFT step / floor = {oft / b:.3f} (cpu), LoRA peft / floor = {cpu['LoRA peft'] / b:.3f}: "
          f"{'below' if oft < 2 * b else 'not below'} 2 x floor, so ours / peft <= 0.5 is "
          f"{'out of reach' if oft < 2 * b else 'possible in principle'}")
    return {"args": vars(args), "cpu_median_s": cpu, "cpu_min_s": cpu_min, "wall_median_s": wall,
            "samples": times, "summary": summary}


def layer_table(args: argparse.Namespace) -> dict:
    import peft
    from torch import nn

    import peftkit

    out = {}
    for d_in, d_out in ((384, 384), (384, 1536), (1536, 384)):
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out)
        x0 = torch.randn(args.batch, args.seq, d_in)
        g0 = torch.randn(args.batch, args.seq, d_out)

        def wrap(lib, cfg, lin=lin) -> nn.Module:
            m = lib.get_peft_model(nn.Sequential(lin), cfg).train()
            with torch.no_grad():  # away from the identity (the same values in both libraries)
                for p in (p for p in m.parameters() if p.requires_grad):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
            return m

        layers = {
            "plain": nn.Sequential(lin).requires_grad_(False),
            "OFT  peft": wrap(peft, peft.OFTConfig(target_modules=["0"])),
            "OFT  ours": wrap(peftkit, peftkit.OFTConfig(target_modules=["0"])),
        }
        if not args.no_boft:
            layers["BOFT peft"] = wrap(peft, peft.BOFTConfig(target_modules=["0"]))
            layers["BOFT ours"] = wrap(peftkit, peftkit.BOFTConfig(target_modules=["0"]))

        def step(m: nn.Module, x0=x0, g0=g0) -> float:
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
        print(f"\none layer, Linear {d_in} -> {d_out}, {tokens} tokens, fwd + bwd, median of {args.layer_reps}")
        print(f"{'config':<10} {'cpu ms':>9} {'overhead':>9}")
        for n in layers:
            print(f"{n:<10} {med[n] * 1e3:9.2f} {(med[n] - med['plain']) * 1e3:9.2f}")
        for method in ("OFT ", "BOFT")[: 1 if args.no_boft else 2]:
            ours, theirs, b = med[f"{method} ours"], med[f"{method} peft"], med["plain"]
            print(f"{method.strip():<5} ours/peft: layer {ours / theirs:.2f}, adapter overhead "
                  f"{(ours - b) / (theirs - b):.2f}")
        out[f"{d_in}x{d_out}"] = med
    return out


if __name__ == "__main__":
    import json

    arguments = parse_args()
    result = main(arguments)
    if not arguments.no_layers:
        result["layers"] = layer_table(arguments)
    if arguments.json:
        with open(arguments.json, "w") as f:
            json.dump(result, f, indent=1)
