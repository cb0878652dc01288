"""AdapterDrop's inference speed-up on the MiniLM (all-MiniLM-L6-v2, 6 layers): forward time with the adapters of
the lowest n layers dropped, over the time with every layer's adapter, same model, same inputs, same process.

    python benchmarks/bench_adapterdrop.py [--reps 7] [--batch 32] [--seq 64] [--threads 1]

Houlsby placement (two adapters per layer, m = 64) and Pfeiffer placement (one, reduction factor 16); robust
AdapterDrop (every layer has an adapter, ``drop_layers`` set at inference). Median of ``--reps`` timed
repetitions (each the mean of 3 forwards, the settings interleaved in every repetition) after 2 warm-up forwards;
prints ms and the ratio no-drop / drop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

PLACEMENTS = {
    "houlsby": {"positions": ["attention_output", "ffn_output"], "bottleneck_size": 64, "reduction_factor": None},
    "pfeiffer": {"positions": ["ffn_output"], "reduction_factor": 16.0},
}


def timed(runs: dict, inputs: dict, reps: int) -> dict:
    """Median ms per forward of each ``runs[key]()`` (which sets the model up and returns it): the runs are
    interleaved in every repetition, so a shared machine's drift falls on all of them alike."""
    import torch

    times: dict = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(2):
            for make in runs.values():
                make()(**inputs)
        for _ in range(reps):
            for key, make in runs.items():
                model = make()
                t0 = time.perf_counter()
                for _ in range(3):
                    model(**inputs)
                times[key].append((time.perf_counter() - t0) / 3)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _dropping(model, n: int):
    model.peft_config["default"].drop_layers = n
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--drops", type=int, nargs="*", default=[0, 3, 5, 6])
    args = ap.parse_args()
    U.setup_env(args.threads)
    import torch

    import peftkit
    from peftkit import tiny_models

    inputs = {"input_ids": torch.randint(1000, 20000, (args.batch, args.seq),
                                         generator=torch.Generator().manual_seed(0))}
    base = tiny_models.minilm().eval()
    runs = {("base", 0): lambda: base}
    for name, placement in PLACEMENTS.items():
        model = peftkit.get_peft_model(tiny_models.minilm(), peftkit.AdapterDropConfig(
            stochastic=True, drop_layers=0, task_type="SEQ_CLS", **placement)).eval()
        for n in args.drops:
            runs[(name, n)] = lambda m=model, n=n: _dropping(m, n)
    ms = timed(runs, inputs, args.reps)
    results = {"base_ms": ms[("base", 0)], "reps": args.reps, "batch": args.batch, "seq": args.seq}
    for name in PLACEMENTS:
        row = {n: ms[(name, n)] for n in args.drops}
        results[name] = {str(n): {"ms": t, "speedup": row[0] / t} for n, t in row.items()}
        print(f"{name}: " + ", ".join(f"drop {n}: {t:.2f} ms (x{row[0] / t:.3f})" for n, t in row.items())
              + f"; the model without adapters: {results['base_ms']:.2f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
