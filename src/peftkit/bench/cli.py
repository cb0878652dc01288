"""``peftkit bench``: its arguments and the command (cli.py only adds the subparser)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from .grid import BenchError, resolve_methods, resolve_models
from .peft_side import PeftMissingError, load_peft
from .report import print_tables, write_outputs
from .run import Options, run_grid

DEFAULT_METHODS = "lora,dora,ia3,loha,lokr,vera,oft,boft,adalora,fourierft,ln_tuning"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", help="method x model grid: parameters, adapter size, step time, memory, latency (vs peft)",
        description="Run a method x model grid and report, per cell, trainable parameters, adapter file size, "
                    "training step time, peak memory (RSS growth of the steps, forked child), unmerged and "
                    "merged inference latency, and with --accuracy SST-2 accuracy after a short fine-tune.")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated registry names or example names (e.g. lora,dora,ia3)")
    p.add_argument("--models", default="minilm", help="comma-separated: minilm,bert-tiny,llama-tiny,gpt2-tiny,vit-tiny")
    p.add_argument("--vs-peft", action="store_true", help="also run Hugging Face peft, interleaved, and report ratios")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repetition (default 3)")
    p.add_argument("--reps", type=int, default=5, help="repetitions; medians are reported (default 5)")
    p.add_argument("--infer-iters", type=int, default=5, help="timed forwards per repetition (default 5)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64, help="tokens per example (text models)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--accuracy", action="store_true",
                   help="SST-2 accuracy of configs/sst2_<method>.yaml after --accuracy-steps steps (minilm)")
    p.add_argument("--accuracy-steps", type=int, default=100)
    p.add_argument("--configs", default="configs", help="folder of the sst2_<method>.yaml recipes")
    p.add_argument("--no-memory", action="store_true", help="skip the forked peak-memory probe")
    p.add_argument("--out", help="write results.json, ratios.json, meta.json, results.md and PNG charts here")
    p.set_defaults(run=command)
    return p


def command_line(args: argparse.Namespace) -> str:
    """The invocation, rebuilt from the parsed arguments (for the report header)."""
    parts = ["peftkit bench", f"--methods {args.methods}", f"--models {args.models}"]
    parts += ["--vs-peft"] if args.vs_peft else []
    parts += [f"--steps {args.steps}", f"--reps {args.reps}"]
    parts += ["--accuracy", f"--accuracy-steps {args.accuracy_steps}"] if args.accuracy else []
    for flag, default in (("infer_iters", 5), ("batch", 16), ("seq", 64), ("threads", 1)):
        if getattr(args, flag) != default:
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    parts += [f"--out {shlex.quote(args.out)}"] if args.out else []
    return " ".join(parts)


def command(args: argparse.Namespace) -> int:

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        methods, models = resolve_methods(args.methods), resolve_models(args.models)
        if min(args.steps, args.reps, args.infer_iters, args.batch, args.seq, args.threads) < 1:
            raise BenchError("--steps, --reps, --infer-iters, --batch, --seq and --threads must be >= 1")
        if args.vs_peft:
            load_peft()
    except (BenchError, PeftMissingError) as exc:
        print(f"peftkit bench: {exc}", file=sys.stderr)
        return 2
    if args.vs_peft and args.reps < 5:
        print(f"peftkit bench: warning: --reps {args.reps} < 5, ratio spreads are not meaningful", file=sys.stderr)
    opts = Options(steps=args.steps, reps=args.reps, infer_iters=args.infer_iters, batch=args.batch, seq=args.seq,
                   vs_peft=args.vs_peft, accuracy=args.accuracy, accuracy_steps=args.accuracy_steps,
                   configs_dir=args.configs if os.path.isdir(args.configs) else None, threads=args.threads,
                   memory=not args.no_memory, log=lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    result = run_grid(methods, models, opts)
    result["meta"]["command"] = command_line(args)
    print_tables(result)
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}")
    print(f"total {time.time() - t0:.0f} s")
    return 0
