"""`peftkit train` causal-LM instruction tuning on a tiny Llama: the loss covers response tokens only."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from peftkit.train import train
from peftkit.train.tasks import TASKS

from .train_helpers import fruit_recipe

ANSWERS = {"red": "apple", "yellow": "banana", "green": "lime", "purple": "grape"}


def _recipe(tmp_path, **train_overrides):
    return fruit_recipe(tmp_path, ANSWERS, 8, **train_overrides)


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
