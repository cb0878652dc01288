"""Sequence packing (``data.packing``) for causal-LM instruction tuning: a packed batch computes what the padded
batch computes (per-example losses and LoRA gradients to 1e-5), on response tokens only, and no example sees
another one in its row."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import peftkit
from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.models import ModelError
from peftkit.train.packing import check_packed_attention, pack_examples, pack_layout
from peftkit.train.tasks import TASKS

from .train_helpers import tiny_llama_dir

ROWS = [  # prompts and responses of different lengths, so rows pack unevenly
    ("which fruit is red?", "apple"),
    ("name a yellow fruit that monkeys like to eat", "a banana, peeled"),
    ("green?", "lime"),
    ("what colour is a ripe grape usually, in most shops around here?", "purple or green"),
    ("sky", "blue most days, grey when it rains"),
    ("is snow cold?", "yes"),
    ("count to three", "one two three"),
]


def _recipe(tmp_path, data=None, train_over=None, **top):
    for name, part in (("train", ROWS), ("test", ROWS[:3])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in part)
    recipe = {
        "model": tiny_llama_dir(tmp_path), "task": "causal_lm", "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear",
                 "init_lora_weights": False},
        "data": {"train": "train.jsonl", "test": "test.jsonl", "text_column": "prompt",
                 "response_column": "response", "max_length": 24, "packing": True, "pack_length": 40,
                 **(data or {})},
        "train": {"max_steps": 3, "batch_size": 7, "lr": 1e-2, "log_every": 1, "save_every": 0, "num_threads": 1,
                  **(train_over or {})},
        "output_dir": str(tmp_path / "run"),
        **top,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(tmp_path / "r.yaml"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    task = TASKS["causal_lm"](_recipe(tmp))
    task.load_data()
    base = task.load_model()
    torch.manual_seed(0)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules="all-linear",
                                                            init_lora_weights=False))
    return task, model.eval()


def _per_example_losses(logits, labels, spans):
    """Mean cross-entropy over each example's supervised tokens; ``spans``: (row, start, length) per example."""
    out = []
    for r, start, n in spans:
        z, y = logits[r, start : start + n - 1], labels[r, start + 1 : start + n]
        out.append(F.cross_entropy(z[y != -100], y[y != -100]))
    return torch.stack(out)


def test_packed_batch_equals_the_padded_batch(setup):
    task, model = setup
    idx = list(range(len(ROWS)))
    packed = task.batch(idx)
    padded = task._encode([task.train_rows[i] for i in idx])
    seqs, labels = task._tokenize([task.train_rows[i] for i in idx])
    expected, layout = pack_examples(seqs, labels, 40, task._pad_id())
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(packed[key], expected[key])
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert len(layout.rows) < len(idx) and max(len(row) for row in layout.rows) >= 3  # really packed
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    spans = {i: (r, start, n) for r, row in enumerate(layout.rows) for i, start, n in row}
    for i, (r, start, n) in spans.items():
        assert torch.equal(packed["position_ids"][r, start : start + n], torch.arange(n))
        # loss on the response tokens only, as in the padded row
        assert torch.equal(packed["labels"][r, start : start + n], padded["labels"][i, :n])
        assert int(padded["attention_mask"][i].sum()) == n
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum()) > 0

    params = [p for p in model.parameters() if p.requires_grad]
    inputs_p = {k: v for k, v in packed.items() if k != "labels"}
    inputs_u = {k: v for k, v in padded.items() if k != "labels"}
    per_p = _per_example_losses(model(**inputs_p).logits, packed["labels"], [spans[i] for i in idx])
    per_u = _per_example_losses(model(**inputs_u).logits, padded["labels"],
                                [(i, 0, len(seqs[i])) for i in idx])
    torch.testing.assert_close(per_p, per_u, atol=1e-5, rtol=0)

    loss_p, loss_u = task.loss(model, packed), task.loss(model, padded)
    assert abs(float(loss_p.detach()) - float(loss_u.detach())) <= 1e-5
    grads_p = torch.autograd.grad(loss_p, params)
    grads_u = torch.autograd.grad(loss_u, params)
    assert max(float(g.abs().max()) for g in grads_u) > 1e-3
    for a, b in zip(grads_p, grads_u):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_no_example_sees_the_one_before_it(setup):
    task, model = setup
    seqs, labels = task._tokenize(task.train_rows)
    batch, layout = pack_examples(seqs, labels, 40, task._pad_id())
    row = next(r for r, items in enumerate(layout.rows) if len(items) >= 2)
    (_, s0, n0), (_, s1, n1) = layout.rows[row][:2]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model(**inputs).logits[row, s1 : s1 + n1]
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][row, s0 : s0 + n0] = (changed["input_ids"][row, s0 : s0 + n0] + 7) % 30000
    after = model(**changed).logits
    torch.testing.assert_close(after[row, s1 : s1 + n1], before, atol=1e-6, rtol=0)
    assert float((after[row, s0 : s0 + n0] - model(**inputs).logits[row, s0 : s0 + n0]).abs().max()) > 1e-2
    # the same change leaks into the later example when the row is one sequence: the check above can fail
    one_seq = {k: v for k, v in changed.items() if k != "position_ids"}
    plain = model(**{k: v for k, v in inputs.items() if k != "position_ids"}).logits[row, s1 : s1 + n1]
    assert float((model(**one_seq).logits[row, s1 : s1 + n1] - plain).abs().max()) > 1e-3


def test_packed_training_run_equals_the_padded_run(tmp_path):
    """Three optimizer steps and the evaluations: the same adapter and test loss as the padded, plain-loss run."""
    for name in ("p", "u"):
        (tmp_path / name).mkdir()
    packed = train(_recipe(tmp_path / "p", train_over={"ce_chunk_size": 5}, output_dir=str(tmp_path / "p" / "run")),
                   quiet=True)  # with the chunked loss too: the two options combine
    padded = train(_recipe(tmp_path / "u", data={"packing": False, "pack_length": None},
                           output_dir=str(tmp_path / "u" / "run")), quiet=True)
    assert abs(packed["test_loss"] - padded["test_loss"]) <= 1e-5
    assert padded["test_loss"] < padded["before_test_loss"]
    a = load_file(str(tmp_path / "p" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "u" / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_layout_first_fit_decreasing_and_one_row_for_flash():
    layout = pack_layout([5, 9, 3, 7, 2], 10)
    assert [[i for i, _, _ in row] for row in layout.rows] == [[1], [3, 2], [0, 4]]
    assert layout.width == 10
    assert [[(s, n) for _, s, n in row] for row in layout.rows][2] == [(0, 5), (5, 2)]
    assert len(pack_layout([5, 9, 3], None).rows) == 1
    with pytest.raises(ValueError, match="does not fit"):
        pack_layout([11], 10)
    batch, _ = pack_examples([[4, 5, 6], [7, 8]], [[-100, 5, 6], [-100, 8]], 8, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 8]]
    batch, _ = pack_examples([[4, 5, 6], [7, 8], [9]], [[-100, 5, 6], [-100, 8], [9]], 4, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]  # the padding restarts too
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, 8, -100, -100]]


class _IgnoresPositions(torch.nn.Module):
    """A causal LM whose forward drops ``position_ids``: its attention cannot see the example boundaries."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, **kw):
        return self.inner(input_ids=input_ids, **kw)


def test_a_model_that_ignores_the_restarts_is_refused():
    from peftkit import tiny_models

    torch.manual_seed(0)
    llama = tiny_models.llama()
    check_packed_attention(llama)
    check_packed_attention(tiny_models.llama(attn_implementation="eager"))
    check_packed_attention(tiny_models.gpt2())
    with pytest.raises(ModelError, match="data.packing: .*see each other"):
        check_packed_attention(_IgnoresPositions(llama))


@pytest.mark.parametrize("change, message", [
    ({"task": "seq_cls"}, "data.packing: only task causal_lm"),
    ({"data": {"packing": "yes"}}, "data.packing: expected true or false"),
    ({"data": {"pack_length": 16}}, r"data.pack_length: expected an integer >= data.max_length \(24\)"),
    ({"data": {"pack_length": 1.5}}, "data.pack_length: expected an integer or null"),
    ({"data": {"packing": False}}, "data.pack_length: only read with data.packing: true"),
    ({"method": "prompt_tuning", "peft": {"num_virtual_tokens": 4}}, "data.packing: method prompt_tuning"),
])
def test_bad_packing_fields_name_their_path(tmp_path, change, message):
    data = change.pop("data", None)
    with pytest.raises(RecipeError, match=message):
        _recipe(tmp_path, data=data, **change)


def test_packing_benchmark_data_options(tmp_path):
    """``bench_packing.py --data``: ``sst2`` rows are sentiment instructions, ``mixed`` interleaves three of them
    with one AG News row, and the overrides make a causal_lm recipe that reads them."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_packing.py")
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.data_overrides("agnews", str(tmp_path)) == []
    with open(bench.AGNEWS) as f:
        news = [json.loads(line) for line in f]
    short = bench.sst2_rows(6)
    assert short[0] == {"prompt": bench.SST2_PROMPT + "when are bears bears and", "response": "positive"}
    assert {r["response"] for r in bench.sst2_rows(200)} == {"positive", "negative"}
    for data, n in (("sst2", 2000), ("mixed", 4 * len(news))):
        overrides = bench.data_overrides(data, str(tmp_path))
        with open(tmp_path / f"{data}.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == n
        recipe = load_recipe(bench.RECIPE, ["data.test=null", *overrides])
        task = TASKS[recipe.task](recipe)
        task.load_data()
        assert task.n_train == n and task.train_rows[0] == (short[0]["prompt"], short[0]["response"])
    assert rows[:3] == short[:3] and rows[3] == news[0] and rows[4:7] == short[3:6] and rows[7] == news[1]
