"""RoAd's claim (arXiv 2409.00119): a batch mixing several adapters costs about as much as one adapter.

One batch of ``--batch`` rows (sequence ``--seq``) whose rows are spread round-robin over 4 RoAd adapters
(``adapter_names=[...]``), against the same batch through a single active adapter; the same for 4 LoRA adapters
(r=8) for comparison, and for peft's RoAd (``--no-peft`` skips it). All adapters random, on all linear layers of a
tiny Llama (hidden 256, 4 layers; ``--model minilm``: the real all-MiniLM-L6-v2). Forward only, no autograd;
interleaved repetitions (order rotated), medians reported, then the ratios mixed / single. Each repetition is
timed on the wall clock and on this thread's CPU clock (with ``--threads 1`` the CPU time is the latency without
what other processes on a shared machine take from it); the ratios are given for both.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_road_mixed.py     # --reps 7 --iters 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import build_minilm, make_batch, setup_env  # noqa: E402

N_ADAPTERS = 4


def tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(  # every width a multiple of RoAd's default group_size (64)
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1000)).eval()


def config(lib, method: str):
    if method == "road":
        return lib.RoadConfig(variant="road_1", group_size=64, target_modules="all-linear", init_weights=False)
    return lib.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)


def build(lib, method: str, model_name: str):
    import torch

    model = tiny_llama() if model_name == "llama" else build_minilm()
    for k in range(N_ADAPTERS):
        torch.manual_seed(100 + k)
        if k == 0:
            model = lib.get_peft_model(model, config(lib, method), adapter_name="a0")
        else:
            model.add_adapter(f"a{k}", config(lib, method))
    model.set_adapter("a0")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--model", choices=("llama", "minilm"), default="llama")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup_env(args.threads)
    import torch

    import peftkit

    models = {"peftkit road": build(peftkit, "road", args.model), "peftkit lora": build(peftkit, "lora", args.model)}
    if not args.no_peft:
        import peft

        models["peft road"] = build(peft, "road", args.model)
    base = tiny_llama() if args.model == "llama" else build_minilm().eval()
    if args.model == "llama":
        batch = {"input_ids": torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))}
    else:
        batch = make_batch(base, args.batch, args.seq, labels=False)
    names = [f"a{i % N_ADAPTERS}" for i in range(args.batch)]

    cases = {"base model": lambda: base(**batch)}
    for key, model in models.items():
        cases[f"{key} mixed"] = lambda m=model: m(**batch, adapter_names=names)
        cases[f"{key} single"] = lambda m=model: m(**batch)
    with torch.no_grad():
        if "peft road" in models:  # both libraries compute the same mixed batch
            ours = models["peftkit road"](**batch, adapter_names=names).logits
            theirs = models["peft road"](**batch, adapter_names=names).logits
            print(f"max |peftkit - peft| on the RoAd mixed batch: {(ours - theirs).abs().max().item():.2e}")
        for fn in cases.values():  # warm-up
            fn()
        samples: dict[str, dict[str, list[float]]] = {clock: {k: [] for k in cases} for clock in ("wall", "cpu")}
        keys = list(cases)
        for rep in range(args.reps):
            for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
                wall, cpu = time.perf_counter(), time.thread_time()
                for _ in range(args.iters):
                    cases[key]()
                samples["cpu"][key].append((time.thread_time() - cpu) / args.iters)
                samples["wall"][key].append((time.perf_counter() - wall) / args.iters)
    med = {clock: {k: statistics.median(v) for k, v in per.items()} for clock, per in samples.items()}
    print(f"{args.model}: batch {args.batch} x seq {args.seq}, {N_ADAPTERS} adapters (RoAd road_1 group 64 / LoRA r=8, "
          f"all-linear), rows round-robin; threads {args.threads}; median of {args.reps} reps x {args.iters} calls")
    print(f"  {'':20s} {'wall ms':>9s} {'spread':>7s} {'cpu ms':>9s} {'spread':>7s}")
    for k in keys:
        cols = []
        for clock in ("wall", "cpu"):
            v, m = samples[clock][k], med[clock][k]
            cols.append(f"{m * 1e3:9.2f} {(max(v) - min(v)) / m:7.0%}")
        print(f"  {k:20s} {' '.join(cols)}")
    ratios = {}
    for clock in ("wall", "cpu"):
        m = med[clock]
        for key in models:
            ratios[f"{clock}: {key} mixed / single"] = m[f"{key} mixed"] / m[f"{key} single"]
        ratios[f"{clock}: peftkit road single / base"] = m["peftkit road single"] / m["base model"]
        ratios[f"{clock}: peftkit road mixed / base"] = m["peftkit road mixed"] / m["base model"]
        if "peft road" in models:
            ratios[f"{clock}: peftkit road mixed / peft road mixed"] = m["peftkit road mixed"] / m["peft road mixed"]
    for k, v in ratios.items():
        print(f"  {k:44s} {v:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "ratios": ratios, "samples_s": samples}, f, indent=1)


if __name__ == "__main__":
    main()
