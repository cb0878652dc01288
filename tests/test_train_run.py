"""`peftkit train` end to end on a tiny BERT: run folder, reproducibility, resume after SIGKILL, accumulation,
NaN stop, and a run's adapter loading in peftkit and in Hugging Face PEFT."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peftkit.train import TrainingError, load_recipe, train

from .train_helpers import env, text_recipe


def _run(tmp_path, *overrides, **sections):
    recipe = load_recipe(str(text_recipe(tmp_path, **sections)), list(overrides))
    return train(recipe, quiet=True), recipe


def _weights(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in f]


def test_run_folder_and_summary(tmp_path):
    summary, recipe = _run(tmp_path)
    run = recipe.output_dir
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml",
                 "metrics.jsonl", "metrics.png", "summary.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    on_disk = json.load(open(os.path.join(run, "summary.json")))
    assert on_disk["trainable_params"] == summary["trainable_params"]
    # LoRA r=4 on query and value of 2 layers of width 32, plus the 2-label classifier (32*2 + 2)
    assert summary["trainable_params"] == 2 * 2 * 4 * (32 + 32) + (32 * 2 + 2)
    assert summary["labels"] == ["negative", "positive"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and "before_test_accuracy" in summary
    assert summary["wall_time_s"] > 0 and summary["total_params"] > summary["trainable_params"]
    steps = [m["step"] for m in _metrics(run) if "loss" in m]
    assert steps == [2, 4, 6, 8, 10, 12]
    # keep_last=2 with save_every=4 over 12 steps: checkpoints at 4 and 8, only the last two kept
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-0000004", "step-0000008"]
    resolved = load_recipe(os.path.join(run, "config.yaml"))
    assert resolved.train.max_steps == 12 and resolved.peft["r"] == 4


def test_training_learns_the_synthetic_task(tmp_path):
    summary, _ = _run(tmp_path, "train.max_steps=60", "train.lr=2e-2", "train.save_every=0")
    assert summary["test_accuracy"] >= 0.9 > summary["before_test_accuracy"]


def test_same_seed_gives_bit_identical_adapters(tmp_path):
    _, a = _run(tmp_path / "a", "peft.lora_dropout=0.1")
    _, b = _run(tmp_path / "b", "peft.lora_dropout=0.1")
    wa, wb = _weights(os.path.join(a.output_dir, "adapter")), _weights(os.path.join(b.output_dir, "adapter"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    _, c = _run(tmp_path / "c", "peft.lora_dropout=0.1", "train.seed=4")
    wc = _weights(os.path.join(c.output_dir, "adapter"))
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_gradient_accumulation_matches_the_bigger_batch(tmp_path):
    _, a = _run(tmp_path / "a", "train.batch_size=8", "train.grad_accum=1")
    _, b = _run(tmp_path / "b", "train.batch_size=4", "train.grad_accum=2")
    wa, wb = _weights(os.path.join(a.output_dir, "adapter")), _weights(os.path.join(b.output_dir, "adapter"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=400", "train.save_every=25", "train.log_every=5", "peft.lora_dropout=0.1"]
    _, full = _run(tmp_path / "full", *steps)
    recipe_path = text_recipe(tmp_path / "killed")
    cmd = [sys.executable, "-m", "peftkit.cli", "train", str(recipe_path), *steps]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(n.startswith("step-") for n in os.listdir(ckpts)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "run" / "summary.json").exists()
    _, resumed = _run(tmp_path / "killed", *steps, "resume=true")
    wf = _weights(os.path.join(full.output_dir, "adapter"))
    wr = _weights(os.path.join(resumed.output_dir, "adapter"))
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert _metrics(full.output_dir) == _metrics(resumed.output_dir)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"loss is nan at step \d+; stopping \(the last good checkpoint is"):
        _run(tmp_path, "train.lr=1e30", "train.max_grad_norm=null", "train.save_every=1", "train.max_steps=50",
             "train.warmup_ratio=0")
    ckpts = os.listdir(tmp_path / "run" / "checkpoints")
    assert ckpts and all(n.startswith("step-") for n in ckpts)
    last = sorted(ckpts)[-1]
    weights = _weights(str(tmp_path / "run" / "checkpoints" / last))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_run_adapter_loads_in_peftkit_and_in_peft(tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit import PeftModel

    _, recipe = _run(tmp_path)
    adapter = os.path.join(recipe.output_dir, "adapter")
    tok = AutoTokenizer.from_pretrained(recipe.model)
    batch = tok(["good great", "awful sad dull"], return_tensors="pt", padding=True)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(recipe.model, num_labels=2).eval()

    ours = PeftModel.from_pretrained(base(), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(base(), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(ours(**batch).logits, base()(**batch).logits, atol=1e-3)


def test_merge_eval_and_inspect_commands(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit import PeftModel
    from peftkit.cli import main as cli_main

    summary, recipe = _run(tmp_path)
    run = recipe.output_dir
    assert cli_main(["eval", run]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == summary["test_accuracy"]

    assert cli_main(["merge", run, "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tok(["good great", "awful sad dull"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(recipe.model, num_labels=2)
    adapted = PeftModel.from_pretrained(base, os.path.join(run, "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=0)
    assert merged.config.id2label == {0: "negative", 1: "positive"}

    capsys.readouterr()
    assert cli_main(["inspect", recipe.model, "--method", "lora", "--set", "r=2"]) == 0
    out = capsys.readouterr().out
    assert "lora: 512 trainable parameters" in out  # 2 layers x (query, value) x r=2 x (32 + 32)
    assert out.count("<- lora: 128") == 4
    assert cli_main(["eval", str(tmp_path / "nope")]) == 2


def test_fish_mask_recipe_scores_parameters_before_training(tmp_path):
    from peftkit.methods.selective import FishMaskConfig  # noqa: F401  (registered)

    summary, recipe = _run(tmp_path, "method=fish_mask", "train.lr=2e-2", "train.max_steps=30",
                           peft={"density": 0.05, "num_samples": 16, "task_type": "SEQ_CLS"})
    cfg = json.load(open(os.path.join(recipe.output_dir, "adapter", "adapter_config.json")))
    kept = sum(v["nnz"] for v in cfg["selected_params"].values())
    head = 32 * 2 + 2
    assert summary["trainable_params"] == kept + head
    assert summary["test_accuracy"] >= 0.9


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    _, a = _run(tmp_path / "a", "peft.lora_dropout=0.1")
    _, b = _run(tmp_path / "b", "peft.lora_dropout=0.1", "train.gradient_checkpointing=true")
    wa, wb = _weights(os.path.join(a.output_dir, "adapter")), _weights(os.path.join(b.output_dir, "adapter"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    from peftkit.train.loop import Trainer

    trainer = Trainer(load_recipe(str(text_recipe(tmp_path / "c")), ["train.gradient_checkpointing=true"]), quiet=True)
    trainer.setup()
    assert trainer.model.get_base_model().is_activation_checkpointing


def test_bf16_autocast_and_loraplus(tmp_path):
    from peftkit.train.loop import Trainer

    recipe = load_recipe(str(text_recipe(tmp_path)), ["train.bf16=true", "train.loraplus_lr_ratio=16"])
    trainer = Trainer(recipe, quiet=True)
    summary = trainer.run()
    lrs = {g["initial_lr"] for g in trainer.optimizer.param_groups if g["params"]}
    assert lrs == {recipe.train.lr, 16 * recipe.train.lr}  # lora_B and 1-D tensors learn 16x faster (as peft)
    batch = trainer.task.batch([0, 1])
    with trainer._autocast():
        logits = trainer.model(**batch).logits
    assert logits.dtype == torch.bfloat16
    assert all(math.isfinite(m["loss"]) for m in _metrics(recipe.output_dir) if "loss" in m)
    assert summary["trainable_params"] > 0


def test_resume_with_a_changed_recipe_says_what_differs(tmp_path):
    """A checkpoint records its recipe; resuming with another lr, seed or peft field is refused, naming each."""
    from peftkit.train.recipe import RecipeError

    steps = ["train.max_steps=4", "train.save_every=2", "train.log_every=2"]
    _run(tmp_path, *steps)
    with pytest.raises(RecipeError) as info:
        _run(tmp_path, *steps, "resume=true", "train.lr=0.123", "peft.r=3", "train.seed=7")
    msg = str(info.value)
    assert "train.lr" in msg and "0.123" in msg and "peft.r" in msg and "train.seed" in msg
    _run(tmp_path, *steps, "resume=true")  # the same recipe resumes
