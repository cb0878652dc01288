"""Per-token decode time of prompt methods with a 20-token prompt, against the base model (issue target <= 1.1).

For each tiny config (GPT-2, Llama: hidden 256, 4 layers) and each method (prompt tuning, P-tuning, prefix
tuning with 20 virtual tokens; LLaMA-Adapter with adapter_len 20 on Llama), greedy ``generate`` with the KV
cache on a batch of 4 left-padded prompts. Decode time per token = (time of 1 + N new tokens - time of 1 new
token) / N, so the prefill (where the virtual tokens are processed once) is left out. The base model is a
separate copy with the same weights; the row "base, prompt + 20" (the base model given a prompt 20 tokens
longer) is the floor of any method that keeps 20 more positions in the cache. Repetitions interleave every case (order rotated); medians. On a machine
that others load, ``--clock cpu`` times this thread's CPU time instead of wall time (steadier, not immune).

    .venv/bin/python benchmarks/bench_prompt_decode.py            # --reps 7 --new 32 --threads 1 --clock wall
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
    if family == "llama":
        out["adaption_prompt"] = peftkit.AdaptionPromptConfig(adapter_len=20, adapter_layers=2)
    return out


def perturb(model) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (time.thread_time), steadier on a machine others load")
    args = ap.parse_args()
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
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    keys = list(cases)
    with torch.no_grad():
        for case in cases.values():
            generate(case, 2)  # warm-up
        for rep in range(args.reps):
            for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
                case = cases[key]
                t0 = clock()
                generate(case, 1)
                t1 = clock()
                generate(case, 1 + args.new)
                t2 = clock()
                samples[key].append(((t2 - t1) - (t1 - t0)) / args.new)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"per-token decode time, batch {args.batch}, prompt 16 (left-padded), {args.new} new tokens, "
          f"20 virtual tokens; median of {args.reps}; threads {args.threads}; {args.clock} clock")
    print("| model | method | ms / token | / base | spread (min-max ratio) |")
    print("| --- | --- | ---: | ---: | --- |")
    rows = []
    for family, name in keys:
        base = med[(family, "base")]
        ratio = med[(family, name)] / base
        ratios = [s / b for s, b in zip(samples[(family, name)], samples[(family, "base")])]
        rows.append({"model": family, "method": name, "ms_per_token": med[(family, name)] * 1e3,
                     "ratio_to_base": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios)})
        print(f"| {family}-tiny | {name} | {med[(family, name)] * 1e3:.2f} | {ratio:.3f} | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "samples_s": {f"{a}/{b}": v for (a, b), v in samples.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
