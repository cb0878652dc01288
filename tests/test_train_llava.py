"""`peftkit train` task image_caption: LLaVA-style tuning of ``llava-tiny`` (CLIP vision tower, projector,
Llama LM) on templated digit questions: the loss covers the answer tokens only, answers are scored by
their tokens' log-probability, the three recipes (projector / projector + LN / projector + LoRA on the LM)
train with exact trainable counts and save adapters that Hugging Face peft loads with the same outputs,
and bad input fails naming its file, line or field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peftkit import tiny_models
from peftkit.train import Trainer, load_recipe
from peftkit.train.data import DataError
from peftkit.train.images import digits
from peftkit.train.models import ModelError
from peftkit.train.llava_models import compose_llava, image_tokens, llava_tiny, tiny_tokenizer
from peftkit.train.tasks import TASKS

from .train_helpers import tiny_llama_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["train.num_threads=1", "data.train_rows=96", "data.test_rows=24", "train.batch_size=16",
        "train.eval_batch_size=64", "train.log_every=100"]

torch.set_num_threads(1)


def _recipe(tmp_path, name="digits_llava_lora", *overrides):
    return load_recipe(str(CONFIGS / f"{name}.yaml"), [f"output_dir={tmp_path / 'run'}", *FAST, *overrides])


def _task(recipe):
    task = TASKS["image_caption"](recipe)
    task.load_data()
    return task, task.load_model().eval()


def _digit_table(tmp_path: Path, words: dict[int, str], n: int = 12, name: str = "train.jsonl") -> Path:
    """A JSONL table of ``n`` digit images saved as .npy files, answered with ``words[label]``."""
    x, y = digits("train")
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(len(y)):
        if int(y[i]) in words and len(rows) < n:
            np.save(tmp_path / "img" / f"{i}.npy", x[i])
            rows.append({"image": f"img/{i}.npy", "label": words[int(y[i])]})
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tiny_llava_builder_takes_its_image_tokens():
    torch.manual_seed(0)
    model = tiny_models.llava().eval()
    n = image_tokens(model.config)
    assert n == 16 and model.config.image_token_id == tiny_models.VOCAB
    ids = torch.cat([torch.full((2, n), tiny_models.VOCAB), torch.randint(0, tiny_models.VOCAB, (2, 5))], 1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert out.shape == (2, n + 5, tiny_models.VOCAB + 1)


def test_composed_llava_keeps_the_pretrained_towers(tmp_path):
    """``llava-smollm2``'s recipe on tiny folders: the CLIP vision tower and the LM are copied exactly, the
    <image> token is added (a new last row), the projector is new."""
    torch.manual_seed(0)
    clip = tiny_models.clip()
    clip.save_pretrained(tmp_path / "clip")
    lm_dir = tiny_llama_dir(tmp_path)
    model, tok = compose_llava(str(tmp_path / "clip"), lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id == lm.config.vocab_size == len(tok) - 1
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == clip.vision_model.state_dict().keys()
    assert all(torch.equal(tower[k], v) for k, v in clip.vision_model.state_dict().items())
    emb = model.model.language_model.embed_tokens.weight
    assert emb.shape[0] == lm.config.vocab_size + 1 and torch.equal(emb[:-1], lm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight[:-1], lm.lm_head.weight)
    for k, v in lm.model.state_dict().items():
        if k != "embed_tokens.weight":
            assert torch.equal(model.model.language_model.state_dict()[k], v), k
    assert model.model.multi_modal_projector.linear_1.in_features == clip.config.vision_config.hidden_size


def test_loss_is_on_the_answer_tokens_only(tmp_path):
    task, model = _task(_recipe(tmp_path))
    prompt = task.prompt_ids
    assert prompt[:16] == [model.config.image_token_id] * 16
    assert task.tok.decode(prompt[16:]) == "what digit is this?"
    assert [task.tok.decode(a) for a in task.answer_ids] == ["zero", "one", "two", "three", "four", "five", "six",
                                                             "seven", "eight", "nine"]
    batch = task.batch([0, 1, 2, 3])
    labels, n = batch["labels"], len(prompt)
    assert (labels[:, :n] == -100).all()
    for i, y in enumerate(task.train_y[:4]):
        want = task.answer_ids[y] + [task.eos]
        assert labels[i, n : n + len(want)].tolist() == want
        assert (labels[i, n + len(want):] == -100).all() and (batch["attention_mask"][i, n + len(want):] == 0).all()
    with torch.no_grad():
        loss = task.loss(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    # by hand: next-token cross-entropy at the positions before each answer token and EOS
    terms = [-F.log_softmax(logits[i, t - 1], -1)[labels[i, t]] for i in range(4) for t in range(labels.shape[1])
             if labels[i, t] != -100]
    assert len(terms) == 8  # one word and its EOS per example
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**batch).loss, atol=1e-6, rtol=1e-6)  # transformers' own loss
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][:, -1] = 7  # a padding / EOS position never feeds a supervised prediction
        torch.testing.assert_close(task.loss(model, changed), loss, atol=1e-6, rtol=1e-6)


def test_answers_are_scored_by_their_tokens_log_probability(tmp_path):
    table = _digit_table(tmp_path, {0: "ankle boot", 1: "bag", 2: "t-shirt/top"})
    recipe = _recipe(tmp_path, "digits_llava_lora", f"data.train={table}", f"data.test={table}",
                     "data.class_template=a photo of a {}.")
    task, model = _task(recipe)
    assert task.answers == ["ankle boot", "bag", "t-shirt/top"]
    assert [len(a) for a in task.answer_ids] == [3, 2, 6]  # "ankle boot." "bag." "t-shirt/top." (WordPiece)
    pixels = task.encode(task.test_x[:5], task.test_y[:5])["pixel_values"]
    with torch.no_grad():
        scores = task.scores(model, pixels)
        for a, toks in enumerate(task.answer_ids):
            enc = task.encode(task.test_x[:5], [a] * 5)
            logp = F.log_softmax(model(input_ids=enc["input_ids"], pixel_values=pixels).logits, -1)
            n = len(task.prompt_ids)
            want = sum(logp[:, n - 1 + j, t] for j, t in enumerate(toks))
            torch.testing.assert_close(scores[:, a], want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        nxt = model(input_ids=torch.tensor([task.prompt_ids] * 5), pixel_values=pixels).logits[:, -1].argmax(-1)
    right = task.generated_correct(model, pixels, task.test_y[:5])
    first = torch.tensor([task.answer_ids[g][0] for g in task.test_y[:5]])
    assert not (right & (nxt != first)).any()  # a greedy answer is right only if its first token is


def _lm_lora(r=8, width=64, inter=128, kv=32, layers=2):
    """LoRA r (d_in + d_out) on q, o (width -> width), k, v (width -> kv) and gate, up, down (width <-> inter)."""
    return layers * r * (2 * (2 * width) + 2 * (width + kv) + 3 * (width + inter))


PROJECTOR = 2 * (64 * 64 + 64)
NORMS = (2 * 2 + 1) * 64  # input / post-attention RMSNorm per layer, and the final norm


LEARN = ("train.max_steps=30", "train.lr=2e-2", "data.train_rows=320", "data.test_rows=48")


@pytest.mark.parametrize("name,trainable,peft_type,overrides,gain", [
    ("digits_llava_projector", PROJECTOR, "LN_TUNING", ("train.max_steps=4",), None),
    ("digits_llava_ln", PROJECTOR + NORMS, "LN_TUNING", ("train.max_steps=4",), None),
    ("digits_llava_lora", PROJECTOR + _lm_lora(), "LORA", LEARN, 0.1),  # 0.146 -> 0.313 here
])
def test_recipes_train_and_peft_loads_their_adapters(tmp_path, name, trainable, peft_type, overrides, gain):
    trainer = Trainer(_recipe(tmp_path, name, *overrides), quiet=True)
    summary = trainer.run()
    assert summary["trainable_params"] == trainable
    assert 0 <= summary["test_generation_accuracy"] <= 1
    if gain is not None:
        assert summary["test_accuracy"] >= summary["before_test_accuracy"] + gain, summary
    folder = tmp_path / "run" / "adapter"
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type and saved["modules_to_save"] == (
        None if name == "digits_llava_projector" else ["multi_modal_projector"])
    # in float64, so that the two libraries' float32 rounding (logits of size ~100 here) is out of the way
    ref = peft.PeftModel.from_pretrained(llava_tiny(tiny_tokenizer()), str(folder)).eval().double()
    ours = trainer.model.eval().double()
    batch = trainer.task.encode(trainer.task.test_x[:6], trainer.task.test_y[:6])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        want, got = ref(**inputs).logits, ours(**inputs).logits
        with ours.disable_adapter():
            plain = ours(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the trained adapter changes the answer logits


def test_bad_input_names_its_file_line_or_field(tmp_path):
    table = _digit_table(tmp_path, {0: "zero", 1: "one"}, n=4)
    rows = table.read_text().splitlines()
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join([rows[0], json.dumps({"label": "one"})] + rows[2:]) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing image column 'image'"):
        _task(_recipe(tmp_path, "digits_llava_lora", f"data.train={missing}"))
    gone = tmp_path / "gone.jsonl"
    gone.write_text("\n".join(rows[:2] + [json.dumps({"image": "img/nope.npy", "label": "one"})]) + "\n")
    with pytest.raises(DataError, match=r"gone\.jsonl:3: image: .*nope\.npy: file not found"):
        _task(_recipe(tmp_path, "digits_llava_lora", f"data.train={gone}"))
    np.save(tmp_path / "img" / "big.npy", np.zeros((28, 28), np.uint8))
    sizes = tmp_path / "sizes.jsonl"
    sizes.write_text("\n".join(rows[:2] + [json.dumps({"image": "img/big.npy", "label": "one"})]) + "\n")
    with pytest.raises(DataError, match=r"sizes\.jsonl:3: image: image 'img/big.npy' is 28x28, the table's first is 8x8"):
        _task(_recipe(tmp_path, "digits_llava_lora", f"data.train={sizes}"))
    with pytest.raises(DataError, match=r"data.class_template: 'What digit is this\?' needs exactly one \{\}"):
        _task(_recipe(tmp_path, "digits_llava_lora", "data.class_template=What digit is this?"))
    test = _digit_table(tmp_path, {2: "two"}, n=2, name="test.jsonl")
    with pytest.raises(DataError, match=r"test\.jsonl: answer 'two' is not among the run's answers"):
        _task(_recipe(tmp_path, "digits_llava_lora", f"data.train={table}", f"data.test={test}"))
    tiny_models.llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelError, match=r"llama is a 'llama' model; task image_caption needs a LLaVA model"):
        _task(_recipe(tmp_path, "digits_llava_lora", f"model={tmp_path / 'llama'}"))
