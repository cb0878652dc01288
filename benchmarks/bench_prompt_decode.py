"""Per-token decode time of prompt methods with a 20-token prompt, against the base model (issue target <= 1.1).

For each tiny config (GPT-2, Llama: hidden 256, 4 layers) and each method (prompt tuning, P-tuning, prefix
tuning with 20 virtual tokens; LLaMA-Adapter with adapter_len 20 in the top 2 layers), greedy ``generate``
with the KV cache on a batch of 4 left-padded prompts. Decode time per token = (time of 1 + N new tokens -
time of 1 new token) / N, so the prefill (where the virtual tokens are processed once) is left out. The base
model is a separate copy with the same weights; the row "base, prompt + 20" (the base model given a prompt
20 tokens longer) is the floor of any method that keeps 20 more positions in the cache. Each repetition
times every case right next to its base model (order alternating, cases rotated), so a slow phase of a
shared machine lands on both sides of a ratio. One process's ratios also carry its memory layout (two
models doing the same work differ by a few percent from one process to the next), so ``--processes`` fresh
processes each measure everything: reported are the median over processes of each process's median paired
ratio, and every process's figure. ``--clock cpu`` times this thread's CPU time instead of wall time.

    .venv/bin/python benchmarks/bench_prompt_decode.py   # --processes 5 --reps 7 --new 32 --threads 1 --clock wall
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 1000


def base_model(family: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=256,
                                           bos_token_id=1, eos_token_id=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=256))
    model.generation_config.pad_token_id = 0
    return model.eval()


def configs(family: str) -> dict:
    import peftkit

    out = {
        "prompt_tuning": peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        "p_tuning": peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=64),
        "prefix_tuning": peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    }
    out["adaption_prompt"] = peftkit.AdaptionPromptConfig(adapter_len=20, adapter_layers=2)
    return out


def perturb(model) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def measure(args) -> dict:
    """One process's paired measurements: {"samples_s": case -> decode times, "paired_ratios": case -> ratios}."""
    torch.set_num_threads(args.threads)
    import peftkit

    def prompts(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, VOCAB, (args.batch, length), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(1, args.batch):  # left padding of 0..3 tokens
            ids[row, :row], mask[row, :row] = 0, 0
        return ids, mask

    inputs, longer = prompts(16), prompts(16 + 20)
    cases = {}
    for family in ("gpt2", "llama"):
        cases[(family, "base")] = (base_model(family), inputs)
        # the floor of any 20-token prompt: the base model attending over 20 more cached positions
        cases[(family, "base, prompt + 20")] = (cases[(family, "base")][0], longer)
        for name, config in configs(family).items():
            model = peftkit.get_peft_model(base_model(family), config)
            perturb(model)
            cases[(family, name)] = (model.eval(), inputs)

    def generate(case, n: int) -> None:
        model, (ids, mask) = case
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       use_cache=True)

    clock = time.perf_counter if args.clock == "wall" else time.thread_time

    def decode_time(case) -> float:
        t0 = clock()
        generate(case, 1)
        t1 = clock()
        generate(case, 1 + args.new)
        t2 = clock()
        return ((t2 - t1) - (t1 - t0)) / args.new

    # paired: each repetition times every case right next to its family's base model (order alternating), so
    # a slow phase of the machine lands on both sides of a ratio
    methods = [k for k in cases if k[1] != "base"]
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    ratios: dict[tuple[str, str], list[float]] = {k: [] for k in methods}
    with torch.no_grad():
        for case in cases.values():
            generate(case, 2)  # warm-up
        for rep in range(args.reps):
            for key in methods[rep % len(methods):] + methods[: rep % len(methods)]:
                base_key = (key[0], "base")
                pair = (base_key, key) if rep % 2 == 0 else (key, base_key)
                times = {k: decode_time(cases[k]) for k in pair}
                samples[key].append(times[key])
                samples[base_key].append(times[base_key])
                ratios[key].append(times[key] / times[base_key])
    return {"samples_s": {f"{a}/{b}": v for (a, b), v in samples.items()},
            "paired_ratios": {f"{a}/{b}": v for (a, b), v in ratios.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7, help="repetitions per process")
    ap.add_argument("--processes", type=int, default=5,
                    help="fresh processes, each measuring every case (memory layout differs from one to the next)")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (time.thread_time), steadier on a machine others load")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: write one process's JSON here
    args = ap.parse_args()
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(measure(args), f)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"{i}.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out, "--reps", str(args.reps),
                            "--new", str(args.new), "--batch", str(args.batch), "--threads", str(args.threads),
                            "--clock", args.clock], check=True)
            with open(out) as f:
                runs.append(json.load(f))
    print(f"per-token decode time, batch {args.batch}, prompt 16 (left-padded), {args.new} new tokens, "
          f"20 virtual tokens; {args.processes} processes x {args.reps} repetitions, each case paired with its "
          f"base; threads {args.threads}; {args.clock} clock")
    print("| model | method | ms / token | / base | per process (median of its paired ratios) |")
    print("| --- | --- | ---: | ---: | --- |")
    rows = []
    for case in runs[0]["samples_s"]:
        family, name = case.split("/")
        ms = statistics.median(statistics.median(run["samples_s"][case]) for run in runs) * 1e3
        per_process = [1.0] if name == "base" else sorted(statistics.median(run["paired_ratios"][case])
                                                          for run in runs)
        ratio = statistics.median(per_process)
        rows.append({"model": family, "method": name, "ms_per_token": ms, "ratio_to_base": ratio,
                     "ratio_per_process": per_process})
        print(f"| {family}-tiny | {name} | {ms:.2f} | {ratio:.3f} | {' '.join(f'{r:.3f}' for r in per_process)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
