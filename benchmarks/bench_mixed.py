"""Mixed-adapter batch vs one adapter, peftkit side by side with Hugging Face peft in the same run.

A batch of ``--batch`` rows (sequence ``--seq``) spread round-robin over ``--adapters`` LoRA adapters
(r=8, all linear layers) on a tiny Llama (hidden 256, 4 layers). For each library: the mixed batch
(``adapter_names=[...]``) and the same batch through a single active adapter, timed in interleaved
repetitions (order rotated), medians reported. Ratio of interest: mixed / single per library (target <= 1.2).

    .venv/bin/python benchmarks/bench_mixed.py            # --reps 7 --iters 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1000)).eval()


def build(lib, n_adapters: int, r: int):
    """A model with ``n_adapters`` random LoRA adapters a0..a{n-1} (same values for both libraries)."""
    model = None
    for k in range(n_adapters):
        cfg = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
        torch.manual_seed(100 + k)
        if model is None:
            model = lib.get_peft_model(tiny_llama(), cfg, adapter_name=f"a{k}")
        else:
            model.add_adapter(f"a{k}", cfg)
    for k in range(n_adapters):  # same values in both libraries: filled by file key, in key order
        name = f"a{k}"
        state = lib.get_peft_model_state_dict(model, adapter_name=name)
        gen = torch.Generator().manual_seed(k)
        lib.set_peft_model_state_dict(
            model, {key: torch.randn(v.shape, generator=gen) * 0.05 for key, v in sorted(state.items())}, name)
    return model.eval()


def timed(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import peft
    import peftkit

    libs = {"peftkit": build(peftkit, args.adapters, args.rank), "peft": build(peft, args.adapters, args.rank)}
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():  # the two libraries compute the same thing
        outs = {k: m(input_ids=ids, adapter_names=names).logits for k, m in libs.items()}
        diff = (outs["peftkit"] - outs["peft"]).abs().max().item()
        print(f"max |peftkit - peft| on the mixed batch: {diff:.2e}")
        assert diff < 1e-4, diff

    cases = {}
    for lib, model in libs.items():
        model.set_adapter("a0")
        cases[f"{lib} mixed"] = lambda m=model: m(input_ids=ids, adapter_names=names)
        cases[f"{lib} single"] = lambda m=model: m(input_ids=ids)
    base = tiny_llama().eval()  # no adapter at all: what any implementation's mixed batch costs at least
    cases["base model"] = lambda: base(input_ids=ids)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    keys = list(cases)
    with torch.no_grad():
        for fn in cases.values():  # warm-up (caches, allocator)
            fn()
        for rep in range(args.reps):
            for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
                samples[key].append(timed(cases[key], args.iters))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"batch {args.batch} x seq {args.seq}, {args.adapters} LoRA adapters r={args.rank} (all-linear), "
          f"tiny Llama; threads {args.threads}; median of {args.reps} reps x {args.iters} calls")
    for k in keys:
        print(f"  {k:16s} {med[k] * 1e3:8.1f} ms")
    result = {
        "median_s": med,
        "peftkit_mixed_over_single": med["peftkit mixed"] / med["peftkit single"],
        "peft_mixed_over_single": med["peft mixed"] / med["peft single"],
        "peftkit_mixed_over_peft_mixed": med["peftkit mixed"] / med["peft mixed"],
        # a floor for any implementation: ">= 2 x peft's throughput" needs this ratio <= 0.5
        "base_over_peft_mixed": med["base model"] / med["peft mixed"],
        "samples_s": samples,
    }
    for k in ("peftkit_mixed_over_single", "peft_mixed_over_single", "peftkit_mixed_over_peft_mixed",
              "base_over_peft_mixed"):
        print(f"  {k:30s} {result[k]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
