"""Loading many small adapters: ``PeftModel.load_adapter`` x N, peftkit side by side with Hugging Face peft.

N adapters (LoRA r=4 on q_proj, v_proj) are saved once, in the PEFT layout, from the tiny Llama (hidden 256,
4 layers). Each repetition wraps a fresh base model with adapter 0 (``from_pretrained``) and then times
``load_adapter`` for the other N - 1 (and, reported separately, the whole load including the first). The two
libraries alternate per repetition (order rotated); medians reported.

    .venv/bin/python benchmarks/bench_loading.py            # --n 100 --reps 5 --threads 1
    .venv/bin/python benchmarks/bench_loading.py --profile  # cProfile of one peftkit run, top 25
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_mixed import tiny_llama  # noqa: E402


def save_adapters(folder: str, n: int) -> list[str]:
    import peftkit

    paths = []
    for k in range(n):
        torch.manual_seed(k)
        model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        path = os.path.join(folder, f"adapter{k}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def load_all(lib, paths: list[str]) -> tuple[float, float]:
    """(seconds for load_adapter of paths[1:], seconds for everything incl. from_pretrained of paths[0])."""
    base = tiny_llama()
    start = time.perf_counter()
    model = lib.PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    mid = time.perf_counter()
    for k, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{k}")
    end = time.perf_counter()
    assert len(model.peft_config) == len(paths)
    return end - mid, end - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import peftkit

    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(tmp, args.n)
        if args.profile:
            import cProfile
            import pstats

            cProfile.runctx("load_all(peftkit, paths)", globals(), {"paths": paths, "peftkit": peftkit}, "/tmp/load.prof")
            pstats.Stats("/tmp/load.prof").sort_stats("cumulative").print_stats(25)
            return
        libs = {"peftkit": peftkit, "peft": peft}
        samples = {k: [] for k in libs}
        totals = {k: [] for k in libs}
        for rep in range(args.reps):
            for name in (list(libs) if rep % 2 == 0 else list(libs)[::-1]):
                adapters_s, total_s = load_all(libs[name], paths)
                samples[name].append(adapters_s)
                totals[name].append(total_s)
    med = {k: statistics.median(v) for k, v in samples.items()}
    tot = {k: statistics.median(v) for k, v in totals.items()}
    print(f"{args.n} LoRA adapters (r=4, q_proj+v_proj) on tiny Llama; threads {args.threads}; median of {args.reps}")
    for k in libs:
        print(f"  {k:8s} load_adapter x{args.n - 1}: {med[k]:6.2f} s   with from_pretrained of the first: {tot[k]:6.2f} s")
    print(f"  ratio peftkit / peft (load_adapter x{args.n - 1}): {med['peftkit'] / med['peft']:.2f}")


if __name__ == "__main__":
    main()
