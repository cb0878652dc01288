"""SST-2 accuracy of every method's recipe on the real MiniLM (configs/sst2_*.yaml), one short fine-tune each.

    python benchmarks/sst2_methods.py [--methods lora,vera,...] [--json docs/sst2_methods.json] [--threads 1]

Each recipe runs through `peftkit train` (600 steps at batch 16 unless the recipe says otherwise) and its
summary is collected: accuracy on the 872-sentence test set before and after, trainable parameters, time.
Several invocations with disjoint --methods can run side by side (one thread each on a 2-core machine);
results are merged into the JSON file by method. The fine-tune is `peftkit.bench.run.finetune`, the one
`peftkit bench --accuracy` runs (there with train.max_steps overridden).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    from peftkit.bench.run import finetune

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", help="comma-separated recipe names (sst2_<name>.yaml); default: all")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "sst2_methods.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "sst2-methods"))
    ap.add_argument("--markdown", action="store_true", help="print the table of --json and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.json))
        return 0
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "sst2_*.yaml")))
    names = {os.path.basename(p)[5:-5]: p for p in paths}
    wanted = args.methods.split(",") if args.methods else sorted(names)
    for name in wanted:
        recipe, summary = finetune(names[name], [f"output_dir={os.path.join(args.out, name)}",
                                                 f"train.num_threads={args.threads}"])
        record = {
            "recipe": f"configs/sst2_{name}.yaml", "method": recipe.method, "peft": recipe.peft,
            "steps": recipe.train.max_steps, "batch_size": recipe.train.batch_size, "lr": recipe.train.lr,
            "accuracy_before": summary["before_test_accuracy"], "accuracy": summary["test_accuracy"],
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "wall_time_s": summary["wall_time_s"], "threads": args.threads,
        }
        print(json.dumps(record), flush=True)
        results = {}
        if os.path.isfile(args.json):
            with open(args.json) as f:
                results = {r["recipe"]: r for r in json.load(f)}
        results[record["recipe"]] = record
        with open(args.json, "w") as f:
            json.dump(sorted(results.values(), key=lambda r: r["recipe"]), f, indent=1)
    return 0


def markdown(path: str) -> str:
    with open(path) as f:
        rows = json.load(f)
    out = ["| recipe | method | lr | trainable | accuracy before | accuracy after | time (s) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        out.append(f"| `{r['recipe']}` | {r['method']} | {r['lr']:g} | {r['trainable_params']:,d} | "
                   f"{100 * r['accuracy_before']:.2f}% | {100 * r['accuracy']:.2f}% | {r['wall_time_s']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
