"""Tiny model folders and data files for the `peftkit train` tests (random weights, the MiniLM tokenizer)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

WORDS_POS = ["good", "great", "fine", "lovely", "superb", "happy", "bright", "warm"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "sad", "grim", "weak", "cold"]


def tokenizer_dir() -> str:
    from peftkit.train.models import minilm_dir

    return minilm_dir()


def tiny_bert_dir(root: Path) -> str:
    """A 2-layer, 32-wide BERT classifier folder (config + safetensors + tokenizer), without dropout."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = root / "tiny-bert"
    if not path.exists():
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))  # no base dropout: batch splits then give equal gradients
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def tiny_llama_dir(root: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / "tiny-llama"
    if not path.exists():
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
            initializer_range=0.3))  # wide enough logits that a low-rank update can move the loss
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Short two-class sentences a tiny model can learn ("positive" / "negative" string labels)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = WORDS_POS if label == "positive" else WORDS_NEG
        rows.append((" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))), label))
    return rows


def write_tsv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    return str(path)


def text_recipe(root: Path, **overrides) -> Path:
    """A recipe file for a tiny BERT on the synthetic sentiment data; ``overrides`` replace YAML sections."""
    import yaml

    data = {"train": write_tsv(root / "train.tsv", ("text", "label"), sentiment_rows(64, 0)),
            "test": write_tsv(root / "test.tsv", ("text", "label"), sentiment_rows(32, 1)),
            "text_column": "text", "label_column": "label", "max_length": 16}
    recipe = {
        "model": tiny_bert_dir(root), "task": "seq_cls", "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"]},
        "data": data,
        "train": {"max_steps": 12, "batch_size": 4, "lr": 5e-3, "seed": 3, "log_every": 2, "save_every": 4,
                  "keep_last": 2, "num_threads": 1},
        "output_dir": str(root / "run"),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict) and key != "peft":
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return e


def fruit_recipe(root: Path, answers: dict[str, str], repeat: int, **train_overrides):
    """A causal_lm LoRA recipe on the tiny Llama: "which fruit is <colour>?" -> the answer, ``repeat`` copies of
    the rows for training, the first 4 for test; ``train_overrides`` go into ``train``."""
    import json

    import yaml

    from peftkit.train import load_recipe

    rows = [{"prompt": f"which fruit is {c}?", "response": f} for c, f in answers.items()] * repeat
    for name, part in (("train", rows), ("test", rows[:4])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    recipe = {
        "model": tiny_llama_dir(root), "task": "causal_lm", "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "train.jsonl", "test": "test.jsonl", "text_column": "prompt",
                 "response_column": "response", "max_length": 32},
        "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-2, "log_every": 10, "save_every": 0, "num_threads": 1,
                  **train_overrides},
        "output_dir": str(root / "run"),
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(root / "r.yaml"))
