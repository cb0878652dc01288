"""Chat-format data (``data.chat_template: true``) for task causal_lm: the tokenizer's chat template renders
``{messages: [...]}`` rows and the labels are exactly the assistant turns' tokens (-100 elsewhere); bad rows
fail with ``file:line`` and the field before the model loads; a tokenizer without a template is a recipe error."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.data import DataError
from peftkit.train.losses import supervised_lm_loss
from peftkit.train.packing import pack_examples
from peftkit.train.tasks import TASKS

from .train_helpers import tiny_llama_dir, tokenizer_dir

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "you answer briefly"},
     {"role": "user", "content": "which fruit is red?"},
     {"role": "assistant", "content": "an apple"},
     {"role": "user", "content": "and yellow?"},
     {"role": "assistant", "content": "a banana, peeled"}],
    [{"role": "user", "content": "is snow cold?"}, {"role": "assistant", "content": "yes"}],
    [{"role": "user", "content": "count to three"}, {"role": "assistant", "content": "one two three"}],
    [{"role": "user", "content": "sky colour"}, {"role": "assistant", "content": "blue most days"}],
]


def _chat_llama(root) -> str:
    """A tiny Llama whose (MiniLM) tokenizer has ChatML special tokens and template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / "chat-llama"
    if not path.exists():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=128, initializer_range=0.3))
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def _write(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _recipe(tmp_path, model=None, train_rows=None, data=None, **top):
    _write(tmp_path / "train.jsonl", train_rows or [{"messages": m} for m in CONVERSATIONS])
    _write(tmp_path / "test.jsonl", [{"messages": m} for m in CONVERSATIONS[1:3]])
    recipe = {
        "model": model or _chat_llama(tmp_path), "task": "causal_lm", "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "train.jsonl", "test": "test.jsonl", "chat_template": True, "max_length": 64, **(data or {})},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "log_every": 1, "save_every": 0, "num_threads": 1},
        "output_dir": str(tmp_path / "run"), **top,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(tmp_path / "r.yaml"))


@pytest.fixture(scope="module")
def chat_task(tmp_path_factory):
    task = TASKS["causal_lm"](_recipe(tmp_path_factory.mktemp("chat")))
    task.load_data()
    model = task.load_model()
    return task, model


def test_labels_are_exactly_the_assistant_turns(chat_task):
    task, _ = chat_task
    tok = task.tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs, labels = task._tokenize(CONVERSATIONS)
    for messages, ids, lab in zip(CONVERSATIONS, seqs, labels):
        # the ids are the whole rendering's ids (no piece boundary changes the tokenization here)
        assert ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        supervised = [i for i, y in zip(ids, lab) if y != -100]
        assert [y for y in lab if y != -100] == supervised
        expected = []
        for m in messages:
            if m["role"] == "assistant":
                expected += tok(m["content"], add_special_tokens=False)["input_ids"] + [end]
        assert supervised == expected
        want = " ".join(f"{m['content']} <|im_end|>" for m in messages if m["role"] == "assistant")
        assert tok.decode(supervised) == tok.decode(tok(want, add_special_tokens=False)["input_ids"])
        unsupervised = tok.decode([i for i, y in zip(ids, lab) if y == -100])
        for m in messages:
            if m["role"] != "assistant":
                assert tok.decode(tok(m["content"], add_special_tokens=False)["input_ids"]) in unsupervised
        assert "assistant" in unsupervised and unsupervised.count("<|im_start|>") == len(messages)


def test_packed_batch_supervises_the_same_tokens(chat_task):
    task, _ = chat_task
    seqs, labels = task._tokenize(CONVERSATIONS)
    packed = pack_examples(seqs, labels, None, 0)[0]
    want = sorted(y for lab in labels for y in lab[1:] if y != -100)  # each example's first label: never a target
    assert sorted(packed["labels"][packed["labels"] != -100].tolist()) == want


def test_loss_is_cross_entropy_on_assistant_tokens_only(chat_task):
    task, model = chat_task
    batch = task._encode(CONVERSATIONS)
    with torch.no_grad():
        got = float(supervised_lm_loss(model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for r, (ids, lab) in enumerate(zip(*task._tokenize(CONVERSATIONS))):
        mask[r, : len(lab)] = torch.tensor([y != -100 for y in lab])
    targets = batch["input_ids"][:, 1:][mask[:, 1:]]
    want = float(F.cross_entropy(logits[:, :-1][mask[:, 1:]], targets))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_two_step_training_run(tmp_path, packing):
    summary = train(_recipe(tmp_path, data={"packing": packing}), quiet=True)
    assert summary["steps"] == 2 and math.isfinite(summary["test_loss"])
    assert summary["test_loss"] != summary["before_test_loss"]  # the adapter moved the assistant-token loss
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == [1, 2]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "hi"}, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     "messages[1].role: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages: no assistant turn"),
    ({"messages": [{"role": "assistant"}]}, "messages[0].content: expected a string"),
    ({"messages": []}, "messages: expected a non-empty list"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, problem):
    good = {"messages": CONVERSATIONS[1]}
    recipe = _recipe(tmp_path, model="/nonexistent/model", train_rows=[good, row, good])
    task = TASKS["causal_lm"](recipe)
    with pytest.raises(DataError) as err:
        task.load_data()  # before any model: the model path does not even exist
    assert f"train.jsonl:2: {problem}" in str(err.value)
    skip = TASKS["causal_lm"](_recipe(tmp_path, model="/nonexistent/model", train_rows=[good, row, good],
                                      data={"bad_rows": "skip"}))
    skip.load_data()
    assert skip.n_train == 2 and any("skipped 1 rows: line 2" in n for n in skip.notes)


def test_tokenizer_without_template_is_a_recipe_error(tmp_path):
    task = TASKS["causal_lm"](_recipe(tmp_path, model=tiny_llama_dir(tmp_path)))
    task.load_data()
    with pytest.raises(RecipeError, match=r"^data\.chat_template: the tokenizer of .* has no chat template"):
        task.load_model()


def test_chat_template_only_for_causal_lm(tmp_path):
    with pytest.raises(RecipeError, match=r"^data\.chat_template: only task causal_lm reads it \(task seq_cls\)"):
        _recipe(tmp_path, model=tiny_llama_dir(tmp_path), task="seq_cls")
