"""`peftkit train` causal-LM instruction tuning on a tiny Llama: the loss covers response tokens only."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import yaml

from peftkit.train import load_recipe, train
from peftkit.train.tasks import TASKS

from .train_helpers import tiny_llama_dir

ANSWERS = {"red": "apple", "yellow": "banana", "green": "lime", "purple": "grape"}


def _recipe(tmp_path, **train_overrides):
    rows = [{"prompt": f"which fruit is {c}?", "response": f} for c, f in ANSWERS.items()] * 8
    for name, part in (("train", rows), ("test", rows[:4])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    recipe = {
        "model": tiny_llama_dir(tmp_path), "task": "causal_lm", "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "train.jsonl", "test": "test.jsonl", "text_column": "prompt",
                 "response_column": "response", "max_length": 32},
        "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-2, "log_every": 10, "save_every": 0, "num_threads": 1,
                  **train_overrides},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(tmp_path / "r.yaml"))


def test_labels_mask_the_prompt_and_padding(tmp_path):
    task = TASKS["causal_lm"](_recipe(tmp_path))
    task.load_data()
    task.load_model()
    batch = task.batch([0, 1])
    for i, (prompt, response) in enumerate(task.train_rows[:2]):
        n_prompt = len(task.tok(prompt + "\n", add_special_tokens=False)["input_ids"])
        n_resp = len(task.tok(response, add_special_tokens=False)["input_ids"])
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:n_prompt] == -100).all()
        assert torch.equal(labels[n_prompt : n_prompt + n_resp], ids[n_prompt : n_prompt + n_resp])
        n = int(batch["attention_mask"][i].sum())
        assert n == n_prompt + n_resp  # the MiniLM tokenizer has no EOS token, so none is appended
        assert (labels[n:] == -100).all()


def test_loss_is_the_response_only_cross_entropy(tmp_path):
    task = TASKS["causal_lm"](_recipe(tmp_path))
    task.load_data()
    model = task.load_model().eval()
    batch = task.batch([0, 1, 2])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        keep = target != -100
        manual = F.cross_entropy(logits[:, :-1][keep], target[keep])
        torch.testing.assert_close(task.loss(model, batch), manual, atol=1e-6, rtol=0)


def test_instruction_tuning_lowers_the_test_loss(tmp_path):
    summary = train(_recipe(tmp_path), quiet=True)
    assert summary["main_metric"] == "test_loss"
    assert summary["test_loss"] < 0.5 * summary["before_test_loss"]
    assert summary["test_perplexity"] < summary["before_test_perplexity"]
