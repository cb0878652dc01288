"""`peftkit estimate` against the measured peak RSS of real LoRA training steps.

Each configuration runs in a fresh subprocess (one at a time): build the model (real MiniLM weights, or a
Llama built from a config), attach LoRA, run 3 AdamW steps, report the peak RSS (``VmHWM``). The parent compares with
``peftkit.estimate.estimate`` and prints a markdown table (and JSON with --json).

    .venv/bin/python benchmarks/bench_estimate.py --json docs/bench_estimate.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

CONFIGS = [  # (model, batch, seq, r, quant)
    ("minilm", 8, 64, 8, None),
    ("minilm", 32, 128, 16, None),
    ("minilm", 16, 128, 16, None),
    ("minilm", 16, 128, 16, "4bit"),
    ("llama-tiny", 8, 64, 8, None),
    ("llama-small", 4, 128, 16, None),
    ("llama-small", 8, 256, 16, None),
    ("llama-small", 4, 128, 16, "4bit"),
    ("llama-160m", 2, 128, 16, None),
    ("llama-160m", 2, 128, 16, "4bit"),
]



def child(model: str, batch: int, seq: int, r: int, quant: str | None) -> None:
    
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForSequenceClassification

    from peftkit import LoraConfig, get_peft_model
    from peftkit.estimate import is_causal, load_config

    torch.manual_seed(0)
    config = load_config(model)
    if model == "minilm":
        from peftkit.train.models import resolve_model

        base = AutoModelForSequenceClassification.from_pretrained(resolve_model(model), num_labels=2)
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_config(config)
    if quant:
        from peftkit.quant import quantize_model

        quantize_model(base, 4 if quant == "4bit" else 8)
    causal = is_causal(config)
    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                         task_type="CAUSAL_LM" if causal else "SEQ_CLS"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, min(config.vocab_size, 20000), (batch, seq))
    labels = ids if causal else torch.randint(0, 2, (batch,))
    for _ in range(3):
        loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak_mb": U.peak_rss_kb() / 1024, "loss": loss.item()}))


def runtime_child() -> None:
    
    import importlib

    for name in ("bitsandbytes", "torch", "transformers", "peftkit", "peftkit.quant"):
        importlib.import_module(name)

    print(json.dumps({"peak_mb": U.peak_rss_kb() / 1024}))


def run(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=5)
    parser.add_argument("--runtime", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--only", type=int, nargs="*")
    a = parser.parse_args()
    if a.runtime:
        return runtime_child()
    if a.child:
        m, b, s, r, q = a.child
        return child(m, int(b), int(s), int(r), None if q == "none" else q)
    from peftkit.estimate import estimate

    rows = [{"config": "runtime (imports only)", **run(["--runtime"])}]
    print(f"runtime: {rows[0]['peak_mb']:.0f} MB", flush=True)
    print("| model | batch x seq | r | base | predicted MB | measured MB | error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (m, b, s, r, q) in enumerate(CONFIGS):
        if a.only and i not in a.only:
            continue
        measured = run(["--child", m, str(b), str(s), str(r), q or "none"])["peak_mb"]
        pred = estimate(m, r=r, batch=b, seq=s, quant=q)
        err = pred["predicted_peak_mb"] / measured - 1
        rows.append({"model": m, "batch": b, "seq": s, "r": r, "quant": q, "measured_mb": round(measured, 1),
                     "predicted_mb": pred["predicted_peak_mb"], "parts": pred["parts"], "error": round(err, 4)})
        print(f"| {m} | {b} x {s} | {r} | {q or 'fp32'} | {pred['predicted_peak_mb']:.0f} | {measured:.0f} | "
              f"{err:+.1%} |", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
