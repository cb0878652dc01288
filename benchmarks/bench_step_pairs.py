#!/usr/bin/env python
"""One bench cell's training step, peftkit vs Hugging Face peft, as many interleaved pairs.

``peftkit bench`` times a few repetitions per cell; for a method at parity with peft its per-repetition ratios
spread +-10-30% on a shared machine. This times ``--pairs`` pairs of ``--steps`` steps, the two libraries
alternating which goes first, on the cell ``peftkit bench`` would build (``--method`` a registry name or example,
``--model`` a bench model, the same example config, batch and sequence), and prints the median of the paired
ratios, the ratio of the medians and the ratio of the fastest pairs.

  .venv/bin/python benchmarks/bench_step_pairs.py --method cartridge --model llama-tiny [--pairs 40] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import peft

    import peftkit
    from peftkit.bench import cells
    from peftkit.bench import measure as M
    from peftkit.bench.grid import MODELS, cell_config, resolve_methods
    from peftkit.bench.peft_side import peft_model

    choice = resolve_methods(args.method)[0]
    config, _ = cell_config(choice, MODELS[args.model], "configs")
    with cells.prepared(choice, MODELS[args.model], config) as (bench_model, config):
        sides = {}
        for name in ("peftkit", "peft"):
            torch.manual_seed(0)
            base = bench_model.build()
            model = (peftkit.get_peft_model(base, choice.spec.config_cls(**config)) if name == "peftkit"
                     else peft_model(peft, choice.spec, base, dict(config)))
            model.train()
            opt, batch = M.make_optimizer(model), bench_model.batch(model, args.batch, args.seq)
            for _ in range(3):
                M.train_step(model, opt, batch)
            sides[name] = (model, opt, batch)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for pair in range(args.pairs):
            for name in ("peftkit", "peft") if pair % 2 == 0 else ("peft", "peftkit"):
                model, opt, batch = sides[name]
                start = time.perf_counter()
                for _ in range(args.steps):
                    M.train_step(model, opt, batch)
                times[name].append((time.perf_counter() - start) / args.steps)
    ours, theirs = times["peftkit"], times["peft"]
    paired = [a / b for a, b in zip(ours, theirs)]
    print(f"{args.method} on {args.model}, {args.pairs} pairs of {args.steps} steps: peftkit "
          f"{1000 * statistics.median(ours):.2f} ms, peft {1000 * statistics.median(theirs):.2f} ms; "
          f"median of paired ratios {statistics.median(paired):.3f}, ratio of medians "
          f"{statistics.median(ours) / statistics.median(theirs):.3f}, fastest / fastest {min(ours) / min(theirs):.3f}")


if __name__ == "__main__":
    main()
