"""`peftkit train` task clip_fewshot: few-shot sampling, class-name prompts as the classifier, a tiny CLIP
learning 16-shot digits with LoRA on both towers, a method's own classifier taking over, and the
pre-trained ``clip-tiny-digits`` (built once, cached, disjoint from the shots and the test split) on which
CoOp and CLIP-Adapter beat zero-shot CLIP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from peftkit.train import RecipeError, load_recipe, train
from peftkit.train import clip_tiny
from peftkit.train.clip_fewshot import few_shot_indices
from peftkit.train.clip_tiny import (
    DIGITS_PRETRAINING,
    PRETRAIN_RECORD,
    DigitsPretraining,
    clip_tiny_digits_dir,
    clip_tiny_digits_path,
    digits_rows,
    pretrain_clip_tiny,
    pretrain_pool,
)
from peftkit.train.data import DataError
from peftkit.train.tasks import TASKS
from peftkit.train.images import digits

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _recipe(tmp_path, *overrides):
    return load_recipe(str(CONFIGS / "digits_clip_lora.yaml"), [f"output_dir={tmp_path / 'run'}", *overrides])


def test_few_shot_indices_take_k_per_class_in_a_seeded_order():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    keep = few_shot_indices(labels, 2, seed=5)
    assert sorted(labels[i] for i in keep) == [0, 0, 1, 1, 2, 2] and keep == sorted(keep)
    assert few_shot_indices(labels, 2, seed=5) == keep  # a pure function of the seed
    assert few_shot_indices(labels, None, seed=0) == list(range(10))
    assert len(few_shot_indices(labels, 10, seed=0)) == 10  # fewer examples than shots: all of them


def test_prompts_are_the_classifier(tmp_path):
    task = TASKS["clip_fewshot"](_recipe(tmp_path))
    task.load_data()
    assert task.n_train == 160 and sorted(set(task.train_y)) == list(range(10))
    assert all(task.train_y.count(c) == 16 for c in range(10))
    model = task.load_model().eval()
    assert task.prompt_ids.shape[0] == 10
    decoded = task.tokenizer.decode(task.prompt_ids[3], skip_special_tokens=True)
    assert decoded == "a photo of a 3."
    pixels = task._inputs(task.test_x[:4])
    with torch.no_grad():
        logits = task.logits(model, pixels)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=task.prompt_ids, attention_mask=task.prompt_mask)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    expected = model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
        torch.nn.functional.normalize(txt, dim=-1).T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_on_both_towers_learns_16_shot_digits(tmp_path):
    summary = train(_recipe(tmp_path, "train.save_every=0"), quiet=True)
    assert summary["before_test_accuracy"] < 0.2  # a random CLIP is at chance
    assert summary["test_accuracy"] >= 0.6  # 0.653 with the recipe as shipped
    assert summary["labels"] == [str(i) for i in range(10)]
    # LoRA r=8 on q_proj and v_proj of 2 text + 2 vision layers, width 64: 8 layers x 8 x (64 + 64)
    assert summary["trainable_params"] == 8 * 8 * 128
    assert os.path.isfile(os.path.join(tmp_path / "run", "adapter", "adapter_model.safetensors"))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]


def test_a_method_classifier_is_used_when_present(tmp_path):
    task = TASKS["clip_fewshot"](_recipe(tmp_path))
    task.load_data()
    task.load_model()
    calls = []

    class WithClassifier(torch.nn.Module):
        def classify(self, pixel_values, class_names, tokenizer, template):
            calls.append((list(class_names), tokenizer, template))
            return torch.zeros(pixel_values.shape[0], len(class_names))

    out = task.logits(WithClassifier(), task._inputs(task.test_x[:3]))
    assert out.shape == (3, 10) and calls == [([str(i) for i in range(10)], task.tokenizer, "a photo of a {}.")]


def test_bad_fields(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.shots: expected a positive integer or null, got 0"):
        _recipe(tmp_path, "data.shots=0")
    task = TASKS["clip_fewshot"](_recipe(tmp_path, "data.class_template=a photo"))
    with pytest.raises(DataError, match=r"data\.class_template: 'a photo' has no \{\} for the class name"):
        task.load_data()


# ---------------------------------------------------------------------------- the pre-trained clip-tiny-digits
@pytest.fixture(scope="module")
def digits_clip(tmp_path_factory):
    """clip-tiny-digits with its shipped settings, built once for this module into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("peftkit-cache")))
        yield Path(clip_tiny_digits_dir())


def _digits_recipe(tmp_path, name, *overrides):
    return load_recipe(str(CONFIGS / f"digits_clip_{name}.yaml"),
                       [f"output_dir={tmp_path / 'run'}", "train.save_every=0", *overrides])


def test_digits_rows_follow_the_builtin_splits():
    x_all, y_all = digits()
    for split in ("train", "test"):
        x, y = digits(split)
        rows = digits_rows(f"builtin:digits/{split}")
        assert (x_all[rows] == x).all() and (y_all[rows] == y).all()
    assert (digits_rows("builtin:digits") == range(len(y_all))).all()


def test_pretraining_pool_is_disjoint_from_the_test_split_and_the_shots(digits_clip, tmp_path):
    pool = set(pretrain_pool().tolist())
    train, test = set(digits_rows("builtin:digits/train").tolist()), set(digits_rows("builtin:digits/test").tolist())
    assert len(pool) == 718 and pool <= train and not pool & test
    record = json.loads((digits_clip / PRETRAIN_RECORD).read_text())
    assert record["pool"] == sorted(pool) and record["settings"]["classes"] == list(range(7))
    _, y_all = digits()
    assert record["pretrain_images"] == sum(y_all[i] < 7 for i in pool)  # digits 7-9 are never shown
    task = TASKS["clip_fewshot"](_digits_recipe(tmp_path, "coop"))
    task.load_data()
    assert task.n_train == 160 and all(task.train_y.count(c) == 16 for c in range(10))
    assert not set(task.train_rows.tolist()) & pool and set(task.train_rows.tolist()) <= train - pool
    assert (task.train_x.numpy() == digits()[0][task.train_rows]).all()
    assert len(task.test_y) == 360 and not any("test images" in n for n in task.notes)
    # a test source that holds pool images loses them, with a note
    task = TASKS["clip_fewshot"](_digits_recipe(tmp_path, "coop", "data.test=builtin:digits"))
    task.load_data()
    assert len(task.test_y) == 1797 - 718 and any("718 of 1797 test images" in n for n in task.notes)


def test_pretrained_clip_is_cached_and_reused(digits_clip, monkeypatch):
    weights = digits_clip / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_retraining(*args, **kwargs):
        raise AssertionError("clip-tiny-digits was pre-trained again")

    monkeypatch.setattr(clip_tiny, "pretrain_clip_tiny", no_retraining)
    assert clip_tiny_digits_dir() == str(digits_clip) == str(clip_tiny_digits_path())
    from peftkit.train.models import resolve_model

    assert resolve_model("clip-tiny-digits") == str(digits_clip)
    assert weights.stat().st_mtime_ns == mtime
    assert digits_clip.name == f"clip-tiny-digits-{DIGITS_PRETRAINING.key()}"
    assert DigitsPretraining(steps=401).key() != DIGITS_PRETRAINING.key()  # other settings, other folder
    assert (digits_clip / "config.json").is_file() and (digits_clip / "tokenizer_config.json").is_file()


def test_pretraining_is_deterministic():
    from transformers import AutoTokenizer

    from peftkit.train.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    short = DigitsPretraining(steps=3, batch_size=16)
    (a, rec_a), (b, rec_b) = pretrain_clip_tiny(tok, short), pretrain_clip_tiny(tok, short)
    assert rec_a["final_loss"] == rec_b["final_loss"]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", ["coop", "adapter"])
def test_coop_and_clip_adapter_beat_zero_shot_clip(digits_clip, tmp_path, name):
    recipe = _digits_recipe(tmp_path, name, "data.shots=8", "train.max_steps=60")
    summary = train(recipe, quiet=True)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    zero_shot, after = on_disk["zero_shot_test_accuracy"], on_disk["test_accuracy"]
    assert 0.5 < zero_shot < 0.75  # digits 0-6 known, 7-9 new to the pre-trained CLIP
    assert after > zero_shot + 0.05, (zero_shot, after)  # 0.675 -> 0.767 (CoOp), 0.764 (CLIP-Adapter)
    assert on_disk["zero_shot_test_accuracy"] == summary["zero_shot_test_accuracy"]
    if name == "coop":  # the context starts as "a photo of a": before training CoOp is zero-shot CLIP
        assert on_disk["before_test_accuracy"] == zero_shot


def test_a_pretrained_clip_keeps_its_image_size(digits_clip, tmp_path):
    task = TASKS["clip_fewshot"](_digits_recipe(tmp_path, "adapter", "data.image_size=32"))
    task.load_data()
    with pytest.raises(DataError, match=r"data\.image_size: 32, but clip-tiny-digits takes 16 px images"):
        task.load_model()
