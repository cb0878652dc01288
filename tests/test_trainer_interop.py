"""A peftkit PeftModel trains unchanged inside `transformers.Trainer`."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model

from .train_helpers import sentiment_rows, tiny_bert_dir


def test_peft_model_trains_in_transformers_trainer(tmp_path):
    folder = tiny_bert_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = sentiment_rows(64)
    enc = tok([t for t, _ in rows], padding="max_length", max_length=12, truncation=True)
    data = [{"input_ids": torch.tensor(enc["input_ids"][i]), "attention_mask": torch.tensor(enc["attention_mask"][i]),
             "labels": torch.tensor(int(y == "positive"))} for i, (_, y) in enumerate(rows)]

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert lora_b
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=30,
                             learning_rate=2e-2, report_to=[], save_strategy="no", logging_steps=10,
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 30
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    # the adapter trained, the base weights did not move
    changed = {n: p for n, p in model.named_parameters() if n in lora_b}
    assert all(not torch.equal(changed[n], lora_b[n]) for n in lora_b)
    for key, value in model.get_base_model().state_dict().items():
        name = key.replace("base_layer.", "")
        if name in frozen and "adapters" not in key and "modules_to_save" not in key:
            assert torch.equal(value, frozen[name]), key

    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    batch = {k: torch.stack([d[k] for d in data[:4]]) for k in ("input_ids", "attention_mask")}
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
