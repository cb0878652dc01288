#!/usr/bin/env python
"""LoRA training step under ``torch.compile`` against eager, on the real MiniLM of ``peftkit bench``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compile.py --reps 7

Two copies of the same model and LoRA (r 8, alpha 16, query and value, a 2-label head), one run eagerly and
one through ``torch.compile(model)`` (inductor, default mode), each with its own AdamW; batch 16 x 64 tokens.
Compilation (the first steps, until the graph is stable) is reported separately and not counted in the step
time. Per repetition each variant runs ``--steps`` timed steps (forward, backward, AdamW step); the variants
alternate within a repetition, order swapped every repetition; medians over repetitions, ratio compiled / eager.
The losses of the two copies are checked to agree before timing (the compiled model computes the same thing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.bench import measure as M
from peftkit.bench.grid import MODELS


def build(seed: int = 0):
    model = MODELS["minilm"].build(seed)
    torch.manual_seed(seed)
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    return get_peft_model(model, config).train()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    eager, compiled = build(), build()
    batch = MODELS["minilm"].batch(eager, a.batch, a.seq)
    run = {"eager": eager, "compiled": torch.compile(compiled)}
    with torch.no_grad():  # same loss (eval: no dropout), compiled against eager
        losses = [m.eval()(**batch).loss for m in run.values()]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    eager.train(), compiled.train()
    opts = {"eager": M.make_optimizer(eager), "compiled": M.make_optimizer(compiled)}

    t0 = time.perf_counter()
    for _ in range(3):  # compile forward and backward (the first steps retrace once requires_grad settles)
        M.train_step(run["compiled"], opts["compiled"], batch)
    compile_s = time.perf_counter() - t0
    M.train_step(run["eager"], opts["eager"], batch)  # warm-up

    samples: dict[str, list[float]] = {k: [] for k in run}
    for rep in range(a.reps):
        for k in (list(run) if rep % 2 == 0 else list(run)[::-1]):
            samples[k].append(M.time_calls(lambda k=k: M.train_step(run[k], opts[k], batch), a.steps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"compilation (3 first steps): {compile_s:.1f} s")
    for k, v in med.items():
        print(f"{k:9s} step: {v * 1e3:8.1f} ms  (median of {a.reps}, {a.steps} steps each)")
    print(f"compiled / eager: {med['compiled'] / med['eager']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
