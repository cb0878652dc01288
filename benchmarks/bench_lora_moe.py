"""LoRA on a mixture-of-experts model's stacked experts (``target_parameters``), peftkit side by side with
Hugging Face peft in one process.

A tiny Mixtral (transformers 5: experts stored as 3-D parameters; ``--experts`` 4, hidden ``--hidden``,
``--layers``) with LoRA (r=8) on ``experts.gate_up_proj`` and ``experts.down_proj`` only: one low-rank delta
per expert. Both libraries get the same seeded LoRA weights (by file key). Measured, per library:

- training step time (forward + causal-LM loss + backward + AdamW step) on a ``--batch`` x ``--seq`` batch:
  ``--iters`` steps per repetition, ``--reps`` repetitions, libraries interleaved (order alternating), median;
- tensors saved for backward during one training forward (``torch.autograd.graph.saved_tensors_hooks``:
  bytes of the distinct storages packed, parameters excluded): the activation memory a step holds;
- peak RSS growth of a training loop in a fresh subprocess per library (the high-water mark over the steps
  minus the RSS before them, so imports and the model itself cancel out; Linux; ``--no-rss`` skips it).

Ratios are ours / peft (target <= 1.0 for time and memory).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_lora_moe.py            # --reps 7 --iters 5 --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_lora_moe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_mixtral(args, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=args.experts, num_experts_per_tok=2))


def build(lib, args):
    cfg = lib.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=[], target_parameters=EXPERTS)
    model = lib.get_peft_model(tiny_mixtral(args), cfg)
    state = lib.get_peft_model_state_dict(model)
    gen = torch.Generator().manual_seed(1)
    lib.set_peft_model_state_dict(model, {k: 0.02 * torch.randn(v.shape, generator=gen)
                                          for k, v in sorted(state.items())})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def batch(args):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=gen)
    return {"input_ids": ids, "labels": ids}


def step(model, opt, inputs) -> float:
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def saved_bytes(model, inputs) -> int:
    """Bytes of the distinct storages autograd saves during one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_child(lib_name: str, args) -> None:
    """Child process: peak RSS over ``--iters`` training steps above the RSS before them (KiB; Linux). The
    parent starts it with glibc's mmap threshold low, so freed tensors go back to the system and the
    high-water mark (reset through /proc/self/clear_refs after a warm-up step) follows the live tensors."""
    import importlib

    lib = importlib.import_module(lib_name)
    model, opt = build(lib, args)
    inputs = batch(args)
    step(model, opt, inputs)  # warm-up: optimizer state, allocator pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    for _ in range(args.iters):
        step(model, opt, inputs)
    print(json.dumps({"rss_growth_kib": _status_kib("VmHWM") - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurement")
    ap.add_argument("--rss-reps", type=int, default=3, help="fresh processes per library for the RSS median")
    ap.add_argument("--json", help="write the raw samples here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return rss_child(args.child, args)

    import peft
    import peftkit

    libs = {"peft": peft, "peftkit": peftkit}
    inputs = batch(args)
    models = {name: build(lib, args) for name, lib in libs.items()}
    losses = {name: step(*models[name], inputs) for name in libs}  # warm-up (and the same loss in both)
    assert abs(losses["peft"] - losses["peftkit"]) < 1e-4, losses
    times: dict[str, list[float]] = {name: [] for name in libs}
    order = list(libs)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            model, opt = models[name]
            start = time.perf_counter()
            for _ in range(args.iters):
                step(model, opt, inputs)
            times[name].append((time.perf_counter() - start) / args.iters)
    saved = {name: saved_bytes(models[name][0], inputs) for name in libs}
    rss = {}
    if not args.no_rss:
        samples: dict[str, list[int]] = {name: [] for name in libs}
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
        for rep in range(args.rss_reps):  # fresh processes, libraries alternating, median
            for name in order if rep % 2 == 0 else order[::-1]:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", name, *sys.argv[1:]]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                samples[name].append(json.loads(out.strip().splitlines()[-1])["rss_growth_kib"])
        rss = {name: statistics.median(v) for name, v in samples.items()}
    med = {name: statistics.median(v) for name, v in times.items()}
    trainable = {name: models[name][0].get_nb_trainable_parameters()[0] for name in libs}
    print(f"tiny Mixtral: {args.layers} layers, hidden {args.hidden}, {args.experts} experts, LoRA r={args.r} on "
          f"{EXPERTS}; batch {args.batch} x {args.seq}; {args.threads} thread(s); trainable {trainable}")
    print(f"{'':28}{'peft':>12}{'peftkit':>12}{'ours/peft':>11}")
    print(f"{'train step (ms, median)':28}{med['peft'] * 1e3:12.2f}{med['peftkit'] * 1e3:12.2f}"
          f"{med['peftkit'] / med['peft']:11.3f}")
    print(f"{'saved for backward (MiB)':28}{saved['peft'] / 2**20:12.2f}{saved['peftkit'] / 2**20:12.2f}"
          f"{saved['peftkit'] / saved['peft']:11.3f}")
    if rss:
        ratio = rss["peftkit"] / rss["peft"] if rss["peft"] else float("nan")
        print(f"{'peak RSS growth (MiB)':28}{rss['peft'] / 1024:12.2f}{rss['peftkit'] / 1024:12.2f}{ratio:11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "times_s": times, "saved_bytes": saved, "rss_growth_kib": rss,
                       "trainable": trainable}, f, indent=1)


if __name__ == "__main__":
    main()
