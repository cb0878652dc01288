#!/usr/bin/env python
"""peftkit vs Hugging Face peft, side by side, in one run.

Measures (see benchmarks/README.md for what each number means):
  1. train   - LoRA / DoRA / full fine-tuning step time on MiniLM (batch 16 x 64)
  2. mem     - training-step peak RSS over setup (fresh subprocess per run) and
               bytes of tensors saved for backward in one forward
  3. infer   - inference time: base, unmerged LoRA, merged LoRA, unmerged DoRA
  4. getpeft - get_peft_model() time and RSS growth on a ~1B-param random Llama

Every repetition runs all configurations of a measurement back to back (order
rotated per repetition), so machine drift hits both libraries alike; the tables
show medians over repetitions and ratios ours/peft.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_foundation.py --json docs/bench_foundation.json
  .venv/bin/python benchmarks/bench_foundation.py --quick --ours peft   # smoke test: peft vs peft
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

SCRIPT = os.path.abspath(__file__)
SECTIONS = ("train", "mem", "infer", "getpeft")
GPM_TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
NAMES = {"lora": "LoRA", "dora": "DoRA"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", default=os.environ.get("PEFTKIT_BENCH_OURS", "peftkit"),
                   help="module measured against peft (default peftkit; 'peft' for a peft-vs-peft "
                        "smoke test; env PEFTKIT_BENCH_OURS)")
    p.add_argument("--reps", type=int, default=7, help="repetitions (medians are reported)")
    p.add_argument("--gpm-reps", type=int, default=5, help="repetitions for get_peft_model on Llama")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per repetition")
    p.add_argument("--infer-iters", type=int, default=10, help="timed forwards per repetition")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for everything")
    p.add_argument("--llama-layers", type=int, default=16, help="16 -> ~0.95B params")
    p.add_argument("--llama-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="1 repetition, few steps: smoke run")
    p.add_argument("--json", help="write all results (with raw samples) to this path")
    p.add_argument("--_child", choices=("mem", "getpeft"), help=argparse.SUPPRESS)
    p.add_argument("--_lib", help=argparse.SUPPRESS)
    p.add_argument("--_method", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.gpm_reps, a.steps, a.infer_iters = 1, 1, 2, 3
    return a


def child_args(a, **extra) -> list[str]:
    out = ["--ours", a.ours, "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
           "--threads", str(a.threads), "--gpm-reps", str(a.gpm_reps),
           "--llama-layers", str(a.llama_layers), "--llama-dtype", a.llama_dtype]
    for k, v in extra.items():
        out += [f"--{k}", str(v)]
    return out


def lib_configs(libs, methods):
    """[(key, lib, method)] with key like 'peft_lora' / 'ours_lora'."""
    return [(f"{side}_{m}", libs[side], m) for m in methods for side in ("peft", "ours")]


# ----------------------------------------------------------------------------- 1. training
def bench_train(a, libs) -> dict:
    configs = [("full", None, "full")] + lib_configs(libs, ("lora", "dora"))
    runners, info = {}, {}
    for key, lib, method in configs:
        model = U.wrap(lib, U.build_minilm(), method)
        model.train()
        opt, batch = U.make_optimizer(model), U.make_batch(model, a.batch, a.seq)
        runners[key] = (lambda m=model, o=opt, b=batch: U.train_step(m, o, b))
        for _ in range(2):  # warm-up (also allocates the AdamW state)
            runners[key]()
        info[key] = {"trainable_params": U.trainable(model)}
    samples = {k: [] for k, _, _ in configs}
    for rep in range(a.reps):
        for key in U.rotate(list(samples), rep):
            samples[key].append(U.time_calls(runners[key], a.steps))
    return {k: {**U.summarize(v), **info[k]} for k, v in samples.items()}


# ----------------------------------------------------------------------------- 2. memory
def child_mem(a) -> dict:
    """Fresh process: build + wrap + optimizer, then peak RSS of the training steps over that."""
    lib = U.load_lib(a._lib) if a._method != "full" else None
    model = U.wrap(lib, U.build_minilm(), a._method)
    model.train()
    opt, batch = U.make_optimizer(model), U.make_batch(model, a.batch, a.seq)
    U.collect()
    setup_kb = U.rss_kb()
    reset_ok = U.reset_peak_rss()
    for _ in range(2 + a.steps):
        U.train_step(model, opt, batch)
    peak_kb, ru_kb = U.peak_rss_kb(), U.ru_maxrss_kb()
    saved = U.saved_tensor_bytes(model, batch)
    return {"setup_rss_kb": setup_kb, "peak_rss_kb": peak_kb, "ru_maxrss_kb": ru_kb,
            "train_peak_over_setup_kb": peak_kb - setup_kb, "peak_reset": reset_ok, "saved": saved,
            "trainable_params": U.trainable(model)}


def bench_mem(a, libs) -> dict:
    configs = lib_configs(libs, ("lora", "dora"))
    runs = {k: [] for k, _, _ in configs}
    for rep in range(a.reps):
        for key, lib, method in U.rotate(configs, rep):
            runs[key].append(U.run_child(SCRIPT, child_args(a, _child="mem", _lib=lib.__name__, _method=method)))
    out = {}
    for key, rs in runs.items():
        out[key] = {"train_peak_over_setup_mb": U.summarize([r["train_peak_over_setup_kb"] / 1024 for r in rs]),
                    "setup_rss_mb": U.median([r["setup_rss_kb"] / 1024 for r in rs]),
                    "saved_activation_mb": rs[0]["saved"]["activation_bytes"] / 2**20,
                    "saved_param_mb": rs[0]["saved"]["param_bytes"] / 2**20,
                    "peak_reset": all(r["peak_reset"] for r in rs)}
    return out


# ----------------------------------------------------------------------------- 3. inference
def bench_infer(a, libs) -> dict:
    import torch

    configs = [("base", None, "full", False)]
    configs += [(k, lib, m, False) for k, lib, m in lib_configs(libs, ("lora",))]
    configs += [(k + "_merged", lib, m, True) for k, lib, m in lib_configs(libs, ("lora",))]
    configs += [(k, lib, m, False) for k, lib, m in lib_configs(libs, ("dora",))]
    runners, info = {}, {}
    for key, lib, method, merge in configs:
        model = U.wrap(lib, U.build_minilm(), method, random_init=True)
        model.eval()
        batch = U.make_batch(model, a.batch, a.seq, labels=False)
        info[key] = {}
        if merge:
            with torch.inference_mode():
                before = model(**batch).logits
                model.merge_adapter()
                info[key]["merge_max_abs_diff"] = (model(**batch).logits - before).abs().max().item()
        runners[key] = (lambda m=model, b=batch: m(**b))
        with torch.inference_mode():
            for _ in range(2):
                runners[key]()
    samples = {k: [] for k in runners}
    with torch.inference_mode():
        for rep in range(a.reps):
            for key in U.rotate(list(samples), rep):
                samples[key].append(U.time_calls(runners[key], a.infer_iters))
    return {k: {**U.summarize(v), **info[k]} for k, v in samples.items()}


# ----------------------------------------------------------------------------- 4. get_peft_model
def build_llama(a, seed=0):
    """~0.95B-param Llama (16 layers) with random weights, built directly in --llama-dtype."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=a.llama_layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, a.llama_dtype))
    try:
        return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def child_getpeft(a) -> dict:
    """One process: build the Llama once; every measurement wraps a fresh deep copy."""
    libs = {"peft": U.load_lib("peft"), "ours": U.load_lib(a.ours)}
    base = build_llama(a)
    n_params = sum(p.numel() for p in base.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    keys = [(f"{side}_{t}", side, t) for t in GPM_TARGETS for side in libs]
    res = {k: {"seconds": [], "rss_growth_mb": [], "peak_growth_mb": []} for k, _, _ in keys}
    for rep in range(-1, a.gpm_reps):  # rep -1: untimed warm-up round (lazy imports, first calls)
        for key, side, tname in U.rotate(keys, rep):
            model = copy.deepcopy(base)
            U.collect()
            rss0 = U.rss_kb()
            U.reset_peak_rss()
            t0 = time.perf_counter()
            pm = U.wrap(libs[side], model, "lora", target_modules=GPM_TARGETS[tname], task_type="CAUSAL_LM")
            dt = time.perf_counter() - t0
            rss1 = U.rss_kb()
            peak = max(U.peak_rss_kb(), rss1)  # kernel RSS counters are batched; keep peak >= now
            if rep >= 0:
                res[key]["seconds"].append(dt)
                res[key]["rss_growth_mb"].append((rss1 - rss0) / 1024)
                res[key]["peak_growth_mb"].append((peak - rss0) / 1024)
            res[key]["trainable_params"] = U.trainable(pm)
            del pm, model
            U.collect()
    del base
    return {"n_params": n_params, "model_mb": model_bytes / 2**20, "dtype": a.llama_dtype, "results": res}


def bench_getpeft(a, libs) -> dict:
    out = U.run_child(SCRIPT, child_args(a, _child="getpeft"))
    for key, r in out["results"].items():
        r.update({"median_s": U.median(r["seconds"]), "median_rss_growth_mb": U.median(r["rss_growth_mb"]),
                  "median_peak_growth_mb": U.median(r["peak_growth_mb"])})
    return out


# ----------------------------------------------------------------------------- report
def fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and abs(x) < 1e-3:
            return f"{x:.2e}"
        return f"{x:.{nd}f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(title, header, rows) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def check(checks, name, value, op, limit):
    ok = value <= limit if op == "<=" else abs(value - limit) <= 0.03  # "~": within 3 %
    checks.append({"check": name, "value": value, "target": f"{op} {limit}", "ok": bool(ok)})


def report_train(a, t, checks, r=U.ratio):
    m = {k: v["median"] for k, v in t.items()}
    rows = [["full FT", m["full"], m["full"], None, t["full"]["trainable_params"], None]]
    for n in ("lora", "dora"):
        p, o = f"peft_{n}", f"ours_{n}"
        rows.append([NAMES[n], m[p], m[o], r(m[o], m[p]), t[p]["trainable_params"], t[o]["trainable_params"]])
    rows.append(["LoRA / full FT", r(m["peft_lora"], m["full"]), r(m["ours_lora"], m["full"]), None, None, None])
    rows.append(["DoRA / LoRA", r(m["peft_dora"], m["peft_lora"]), r(m["ours_dora"], m["ours_lora"]), None, None, None])
    for side in ("peft", "ours"):  # the two ran back to back in each repetition: their ratio drifts less
        paired = sorted(d / l for d, l in zip(t[f"{side}_dora"]["samples"], t[f"{side}_lora"]["samples"]))
        t[f"{side}_dora"]["dora_over_lora_per_rep"] = paired
    pp, po = t["peft_dora"]["dora_over_lora_per_rep"], t["ours_dora"]["dora_over_lora_per_rep"]
    rows.append(["DoRA / LoRA per rep, median (min-max)", f"{U.median(pp):.3f} ({pp[0]:.3f}-{pp[-1]:.3f})",
                 f"{U.median(po):.3f} ({po[0]:.3f}-{po[-1]:.3f})", None, None, None])
    check(checks, "train LoRA step ours/peft", r(m["ours_lora"], m["peft_lora"]), "<=", 0.95)
    check(checks, "train DoRA/LoRA step (ours)", r(m["ours_dora"], m["ours_lora"]), "<=", 1.09)
    return table(f"Training step, s/step (median of {a.reps} reps x {a.steps} steps)",
                 ["config", "peft", "ours", "ours/peft", "trainable peft", "trainable ours"], rows)


def report_mem(a, mm, checks, r=U.ratio):
    rows = []
    for n in ("lora", "dora"):
        p, o = mm[f"peft_{n}"], mm[f"ours_{n}"]
        pk, ok = p["train_peak_over_setup_mb"]["median"], o["train_peak_over_setup_mb"]["median"]
        rows.append([f"{NAMES[n]} train peak RSS over setup (MiB)", pk, ok, r(ok, pk)])
        for label, f in (("saved-for-backward activations", "saved_activation_mb"),
                         ("saved-for-backward params", "saved_param_mb"), ("RSS after setup", "setup_rss_mb")):
            rows.append([f"{NAMES[n]} {label} (MiB)", p[f], o[f], r(o[f], p[f])])
        if n == "lora":
            check(checks, "train LoRA peak memory ours/peft", r(ok, pk), "<=", 1.0)
    return table(f"Training memory (fresh process per run, median of {a.reps})",
                 ["metric", "peft", "ours", "ours/peft"], rows)


def report_infer(a, inf, checks, r=U.ratio):
    i = {k: v["median"] for k, v in inf.items()}
    rows = [["base model", i["base"], i["base"], 1.0, 1.0, None]]
    for label, k in (("LoRA unmerged", "lora"), ("LoRA merged", "lora_merged"), ("DoRA unmerged", "dora")):
        p, o = i[f"peft_{k}"], i[f"ours_{k}"]
        rows.append([label, p, o, r(p, i["base"]), r(o, i["base"]), r(o, p)])
    diff = "merge_max_abs_diff"
    rows.append(["merge: max abs logits change", inf["peft_lora_merged"][diff], inf["ours_lora_merged"][diff],
                 None, None, None])
    check(checks, "infer unmerged LoRA / base (ours)", r(i["ours_lora"], i["base"]), "<=", 1.05)
    check(checks, "infer merged LoRA / base (ours)", r(i["ours_lora_merged"], i["base"]), "~", 1.0)
    check(checks, "infer unmerged DoRA / base (ours)", r(i["ours_dora"], i["base"]), "<=", 1.2)
    return table(f"Inference, s/forward (median of {a.reps} reps x {a.infer_iters})",
                 ["config", "peft", "ours", "peft/base", "ours/base", "ours/peft"], rows)


def report_getpeft(a, gp, checks, r=U.ratio):
    rows = []
    for t in GPM_TARGETS:
        p, o = gp["results"][f"peft_{t}"], gp["results"][f"ours_{t}"]
        rows.append([f"{t}: seconds", p["median_s"], o["median_s"], r(o["median_s"], p["median_s"])])
        rows.append([f"{t}: RSS growth (MiB)", p["median_rss_growth_mb"], o["median_rss_growth_mb"], None])
        rows.append([f"{t}: peak RSS growth (MiB)", p["median_peak_growth_mb"], o["median_peak_growth_mb"], None])
        rows.append([f"{t}: trainable params", p["trainable_params"], o["trainable_params"], None])
        check(checks, f"get_peft_model ({t}) ours/peft", r(o["median_s"], p["median_s"]), "<=", 0.5)
        check(checks, f"get_peft_model ({t}) ours peak growth / model size",
              r(o["median_peak_growth_mb"], gp["model_mb"]), "<=", 0.1)
    return table(f"get_peft_model on Llama {gp['n_params'] / 1e9:.2f}B params, {gp['dtype']}, "
                 f"{gp['model_mb']:.0f} MiB (median of {a.gpm_reps}); qv = q_proj,v_proj, all = all-linear",
                 ["metric", "peft", "ours", "ours/peft"], rows)


def report(a, res) -> str:
    checks, out = [], []
    for sec, fn in (("train", report_train), ("mem", report_mem), ("infer", report_infer),
                    ("getpeft", report_getpeft)):
        if sec in res:
            out.append(fn(a, res[sec], checks))
    out.append(table("Targets (peftkit)", ["check", "value", "target", "ok"],
                     [[c["check"], c["value"], c["target"], "yes" if c["ok"] else "NO"] for c in checks]))
    res["checks"] = checks
    return "\n".join(out)


def warn_mismatches(res) -> list[str]:
    """Same config should give the same trainable-parameter counts in both libraries."""
    pairs = [(f"train/{n}", res["train"][f"peft_{n}"], res["train"][f"ours_{n}"])
             for n in ("lora", "dora") if "train" in res]
    pairs += [(f"get_peft_model/{t}", res["getpeft"]["results"][f"peft_{t}"], res["getpeft"]["results"][f"ours_{t}"])
              for t in GPM_TARGETS if "getpeft" in res]
    return [f"{name}: trainable params differ (peft {p['trainable_params']} vs ours {o['trainable_params']})"
            " - configurations are not comparable" for name, p, o in pairs
            if p["trainable_params"] != o["trainable_params"]]


def main():
    a = parse_args()
    U.setup_env(a.threads)
    if a._child:
        U.emit_result(child_mem(a) if a._child == "mem" else child_getpeft(a))
        return
    import torch
    import transformers

    libs = {"peft": U.load_lib("peft"), "ours": U.load_lib(a.ours)}
    if a.reps < 5 and not a.quick:
        print(f"warning: --reps {a.reps} < 5", file=sys.stderr)
    meta = {"ours": U.lib_version(libs["ours"]), "peft": U.lib_version(libs["peft"]),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(a),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# peftkit foundation benchmark\n\nours = {meta['ours']}\npeft = {meta['peft']}\n"
          f"torch {meta['torch']}, transformers {meta['transformers']}, threads {meta['threads']}, "
          f"reps {a.reps}{' (QUICK smoke run)' if a.quick else ''}", flush=True)
    res = {"meta": meta}
    fns = {"train": bench_train, "mem": bench_mem, "infer": bench_infer, "getpeft": bench_getpeft}
    for sec in [s.strip() for s in a.only.split(",") if s.strip()]:
        t0 = time.perf_counter()
        print(f"... {sec}", file=sys.stderr, flush=True)
        res[sec] = fns[sec](a, libs)
        print(f"... {sec} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    print(report(a, res))
    for w in warn_mismatches(res):
        print(f"\nWARNING: {w}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
