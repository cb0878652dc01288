"""Time of LoRA's thin (rank-r) products on CPU in the two operand orders: ``a @ b`` and ``(b^T a^T)^T``.

The MiniLM's layer shapes at 1024 tokens (batch 16 x 64), r = 8 by default; medians of 9 repetitions, the
variants interleaved. See docs/benchmarks.md ("Thin products") and ``peftkit.methods.lora.kernels.skinny_mm``.

    .venv/bin/python benchmarks/bench_thin_products.py [--threads 1] [--rank 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fns: dict, calls: int = 200, reps: int = 9, clock=time.perf_counter) -> dict[str, float]:
    """Median microseconds per call of each function, the functions interleaved in every repetition."""
    for f in fns.values():
        for _ in range(20):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            for _ in range(calls):
                f()
            samples[k].append((clock() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    n, r = args.tokens, args.rank
    print(f"us per call, {n} tokens, r = {r}, {args.threads} thread(s): as written / as (b^T a^T)^T")
    print("| d_in -> d_out | x @ A^T | g @ B | g^T @ h (grad B) | grad_h^T @ x (grad A) |")
    print("| --- | --- | --- | --- | --- |")
    for d_in, d_out in ((384, 384), (384, 1536), (1536, 384)):
        x, A, B, g = torch.randn(n, d_in), torch.randn(r, d_in), torch.randn(d_out, r), torch.randn(n, d_out)
        h, gh = x @ A.t(), g @ B
        t = timed({
            "xA": lambda: x @ A.t(), "xA_t": lambda: (A @ x.t()).t(),
            "gB": lambda: g @ B, "gB_t": lambda: (B.t() @ g.t()).t(),
            "gh": lambda: g.t() @ h, "gh_t": lambda: (h.t() @ g).t(),
            "ghx": lambda: gh.t() @ x, "ghx_t": lambda: (x.t() @ gh).t(),
        }, clock=clock)
        cells = [f"{t[k]:.0f} / {t[k + '_t']:.0f}" for k in ("xA", "gB", "gh", "ghx")]
        print(f"| {d_in} -> {d_out} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
