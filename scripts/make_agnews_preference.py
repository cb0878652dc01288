"""Build examples/data/agnews_preference/ (the ``task: dpo`` recipes' pairs) from examples/data/agnews_instruct/.

Each AG News instruction row ``{prompt, response}`` becomes ``{prompt, chosen, rejected}``: the prompt unchanged
(the topic question and the news text), ``chosen`` the true topic, ``rejected`` one of the three wrong topics,
drawn with a seeded generator. The first 1,000 training rows and the first 200 test rows are kept.

    python scripts/make_agnews_preference.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["World", "Sports", "Business", "Sci/Tech"]
ROOT = Path(__file__).resolve().parents[1] / "examples" / "data"
ROWS = {"train": 1000, "test": 200}


def build(split: str, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    with open(ROOT / "agnews_instruct" / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["response"] not in TOPICS:
                raise ValueError(f"{split}: unknown topic {row['response']!r}")
            wrong = rng.choice([t for t in TOPICS if t != row["response"]])
            out.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": wrong})
            if len(out) == n:
                break
    return out


def main() -> None:
    folder = ROOT / "agnews_preference"
    folder.mkdir(exist_ok=True)
    for i, (split, n) in enumerate(ROWS.items()):
        rows = build(split, n, seed=i)
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{folder / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
