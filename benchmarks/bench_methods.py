#!/usr/bin/env python
"""Every method peftkit shares with Hugging Face peft, side by side on the real MiniLM: training step time
and peak memory, ours / peft.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_methods.py --json docs/bench_methods.json

Same config (field names are shared) on the same model: all-MiniLM-L6-v2 with a 2-label head, batch 16 x
64 tokens, targets query and value (the method's own default for (IA)3; every LayerNorm for LN tuning).
Step time: forward + backward + AdamW step, 3 timed steps after a warm-up step, per repetition; the two
libraries alternate within each repetition (order swapped every repetition); the median over repetitions is
reported. (`peftkit bench --models minilm --vs-peft` is the general harness: same model, batch and interleaving, with
the registry's configs; this script keeps the q/v configs and JSON layout of docs/bench_methods.json and reuses
its model, peft mapping and step code.) Memory: a fresh subprocess per (library, method) builds the model, wraps it, then trains 3 steps
while a thread samples RSS every millisecond; reported are the peak RSS while training and its growth over
the RSS after set-up (what the method's activations, gradients and optimizer state add), with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

QV = ["query", "value"]
METHODS = {  # name -> (config class, kwargs); both libraries take the same fields
    "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    "dora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": QV, "use_dora": True}),
    "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "total_step": 1000, "target_modules": QV}),
    "vera": ("VeraConfig", {"r": 256, "target_modules": QV}),
    "pvera": ("PveraConfig", {"r": 256, "target_modules": QV}),
    "loha": ("LoHaConfig", {"r": 8, "alpha": 8, "target_modules": QV}),
    "lokr": ("LoKrConfig", {"r": 8, "alpha": 8, "target_modules": QV}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 32, "target_modules": QV}),
    "boft": ("BOFTConfig", {"boft_block_size": 8, "boft_n_butterfly_factor": 1, "target_modules": QV}),
    "ia3": ("IA3Config", {}),
    "fourierft": ("FourierFTConfig", {"n_frequency": 1000, "scaling": 150.0, "target_modules": QV}),
    "waveft": ("WaveFTConfig", {"n_frequency": 2592, "scaling": 25.0, "target_modules": QV}),
    "ln_tuning": ("LNTuningConfig", {"target_modules": ["LayerNorm"]}),
    "beft": ("BeftConfig", {"target_modules": ["value"]}),
    "c3a": ("C3AConfig", {"block_size": 48, "target_modules": QV}),
    "adamss": ("AdamssConfig", {"r": 100, "num_subspaces": 5, "subspace_rank": 1, "target_modules": QV}),
    "tinylora": ("TinyLoraConfig", {"r": 2, "u": 64, "target_modules": QV}),
    "frod": ("FrodConfig", {"sparse_rate": 0.01, "progressbar": False, "target_modules": QV}),
    # parity methods, part 1 (the configs of configs/sst2_<name>.yaml on query + value)
    "hra": ("HRAConfig", {"r": 8, "target_modules": QV}),
    "delora": ("DeloraConfig", {"r": 8, "delora_lambda": 15, "target_modules": QV}),
    "psoft": ("PsoftConfig", {"r": 32, "psoft_alpha": 32, "target_modules": QV}),
    "vblora": ("VBLoRAConfig", {"r": 4, "num_vectors": 256, "vector_length": 128, "topk": 2, "target_modules": QV}),
    "unilora": ("UniLoraConfig", {"r": 4, "theta_d_length": 23040, "target_modules": QV}),
    "miss": ("MissConfig", {"r": 64, "target_modules": QV}),
    "hira": ("HiraConfig", {"r": 32, "target_modules": QV}),
    "shira": ("ShiraConfig", {"r": 32, "random_seed": 0, "target_modules": QV}),
    "randlora": ("RandLoraConfig", {"r": 32, "randlora_alpha": 640, "target_modules": QV}),
    "gralora": ("GraloraConfig", {"r": 32, "alpha": 64, "gralora_k": 2, "target_modules": QV}),
    "lily": ("LilyConfig", {"r": 32, "stride_A": 2, "num_B": 3, "target_modules": QV}),
    "glora": ("GloraConfig", {"r": 8, "target_modules": QV}),
    "supertuning": ("SupertuningConfig", {"sparsity": 0.99, "target_modules": QV}),
    "road": ("RoadConfig", {"variant": "road_1", "group_size": 64, "target_modules": QV}),
    "osf": ("OSFConfig", {"effective_rank": 0.5, "target_modules": QV}),
    "peanut": ("PeanutConfig", {"r": 32, "depth": 0, "act_fn": "relu", "target_modules": QV}),
    "deft": ("DeftConfig", {"r": 8, "decomposition_method": "relu", "target_modules": QV}),
    "poly": ("PolyConfig", {"r": 8, "n_tasks": 4, "n_skills": 4, "n_splits": 1, "target_modules": QV}),
    "multitask_prompt_tuning": ("MultitaskPromptTuningConfig", {"num_virtual_tokens": 16, "num_tasks": 4,
                                                                 "num_ranks": 1}),
}
LIBS = ("peftkit", "peft")
# peftkit only (peft has no selective methods besides LN tuning): memory of FISH mask and diff pruning against
# LoRA and full fine-tuning ("full": no adapter, every parameter trains)
SELECTIVE = {
    "full": None,
    "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    "fish_mask": ("FishMaskConfig", {"density": 0.005, "criterion": "random"}),
    "diff_pruning": ("DiffPruningConfig", {"density": 0.005}),
    # LoRA variants peft lacks (METHODS needs a peft counterpart): LoRA's q/v config, memory against LoRA
    "lorafa": ("LoraFAConfig", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
    "deltalora": ("DeltaLoraConfig", {"r": 8, "lora_alpha": 16, "update_start_step": 0, "target_modules": QV}),
    "dylora": ("DyLoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": QV}),
}


def _spec(cls_name: str):
    from peftkit import list_methods

    return next(spec for spec in list_methods() if spec.config_cls.__name__ == cls_name)


def build(lib_name: str, method: str, seed: int = 0, table: dict = METHODS):
    """The MiniLM of `peftkit bench` wrapped by one library; the peft side maps through peftkit.bench."""
    import torch

    from peftkit import get_peft_model
    from peftkit.bench.grid import MODELS
    from peftkit.bench.peft_side import load_peft, peft_model

    model = MODELS["minilm"].build(seed)
    torch.manual_seed(seed)
    if table[method] is None:  # full fine-tuning
        return model.train()
    cls_name, kwargs = table[method]
    spec, kwargs = _spec(cls_name), {"task_type": "SEQ_CLS", **kwargs}
    if lib_name == "peft":
        model = peft_model(load_peft(), spec, model, kwargs)
    else:
        model = get_peft_model(model, spec.config_cls(**kwargs))
    if hasattr(model, "prepare_selection"):
        model.prepare_selection()  # FISH with criterion="random" selects without data; a no-op otherwise
    model.train()
    return model


def _batch(model, a):
    from peftkit.bench.grid import MODELS

    return MODELS["minilm"].batch(model, a.batch, a.seq)


def step_times(a) -> dict:
    """Interleaved step times (the loop of `peftkit bench`, kept here for this script's JSON layout)."""
    import torch

    from peftkit.bench import measure as M

    samples: dict[str, dict[str, list[float]]] = {m: {lib: [] for lib in LIBS} for m in a.methods}
    for method in a.methods:
        models = {lib: build(lib, method) for lib in LIBS}
        opts = {lib: M.make_optimizer(m) for lib, m in models.items()}
        batch = _batch(models["peft"], a)
        for lib in LIBS:  # warm-up
            M.train_step(models[lib], opts[lib], batch)
        for rep in range(a.reps):
            order = LIBS if rep % 2 == 0 else LIBS[::-1]
            for lib in order:
                samples[method][lib].append(
                    M.time_calls(lambda m=models[lib], o=opts[lib]: M.train_step(m, o, batch), a.steps))
        del models, opts
        torch.manual_seed(0)
    return samples


def child_memory(a) -> dict:
    """RSS after set-up, and the peak RSS while training 3 steps (sampled every millisecond)."""
    from peftkit.bench import measure as M

    model = build(a._lib, a._method, table=SELECTIVE if a._selective else METHODS)
    opt = M.make_optimizer(model)
    batch = _batch(model, a)
    return U.rss_during(lambda: [M.train_step(model, opt, batch) for _ in range(3)])


def memory(a, methods: list[str], libs: tuple[str, ...] = LIBS, selective: bool = False) -> dict:
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        out[method] = {}
        for lib in libs:
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--_lib", lib, "--_method", method,
                   "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]
            cmd += ["--_selective"] if selective else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith(U.RESULT_MARK))
            out[method][lib] = json.loads(line[len(U.RESULT_MARK):])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_lib", help=argparse.SUPPRESS)
    p.add_argument("--_method", help=argparse.SUPPRESS)
    p.add_argument("--_selective", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-selective", action="store_true", help="skip the FISH / diff-pruning memory table")
    a = p.parse_args()
    a.methods = a.methods.split(",")
    U.setup_env(a.threads)
    if a._child:
        print(U.RESULT_MARK + json.dumps(child_memory(a)), flush=True)
        return 0
    started = time.time()
    times = step_times(a)
    mem = memory(a, a.methods)
    rows = []
    print(f"{'method':<10} {'peftkit s':>10} {'peft s':>10} {'time ratio':>10} {'spread':>14} "
          f"{'ours +MB':>9} {'peft +MB':>9} {'+mem ratio':>10} {'peak ratio':>10}")
    for m in a.methods:
        ours, theirs = statistics.median(times[m]["peftkit"]), statistics.median(times[m]["peft"])
        ratios = sorted(o / t for o, t in zip(times[m]["peftkit"], times[m]["peft"]))
        grow = {lib: mem[m][lib]["train_peak_mb"] - mem[m][lib]["setup_mb"] for lib in LIBS}
        row = {"method": m, "step_time_s": {"peftkit": ours, "peft": theirs}, "step_time_ratio": ours / theirs,
               "ratio_spread": [ratios[0], ratios[-1]], "memory_mb": mem[m], "train_growth_mb": grow,
               "train_growth_ratio": grow["peftkit"] / grow["peft"],
               "peak_mem_ratio": mem[m]["peftkit"]["train_peak_mb"] / mem[m]["peft"]["train_peak_mb"],
               "samples": times[m]}
        rows.append(row)
        print(f"{m:<10} {ours:>10.4f} {theirs:>10.4f} {row['step_time_ratio']:>10.3f} "
              f"{ratios[0]:>6.3f}-{ratios[-1]:<6.3f} {grow['peftkit']:>9.0f} {grow['peft']:>9.0f} "
              f"{row['train_growth_ratio']:>10.3f} {row['peak_mem_ratio']:>10.3f}")
    selective = {}
    if not a.no_selective:
        sel = memory(a, list(SELECTIVE), ("peftkit",), selective=True)
        print(f"\n{'peftkit':<13} {'after set-up MB':>16} {'training peak MB':>17} {'growth MB':>10}")
        for m, r in sel.items():
            r = r["peftkit"]
            selective[m] = {**r, "growth_mb": r["train_peak_mb"] - r["setup_mb"]}
            print(f"{m:<13} {r['setup_mb']:>16.0f} {r['train_peak_mb']:>17.0f} {selective[m]['growth_mb']:>10.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
                       "wall_s": time.time() - started, "rows": rows, "selective_memory": selective}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
