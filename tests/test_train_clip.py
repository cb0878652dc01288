"""`peftkit train` task clip_fewshot: few-shot sampling, class-name prompts as the classifier, a tiny CLIP
learning 16-shot digits with LoRA on both towers, and a method's own classifier taking over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.clip_fewshot import few_shot_indices
from peftkit.train.data import DataError
from peftkit.train.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


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
    with pytest.raises(RecipeError, match=r"data\.shots: expected a positive integer, got 0"):
        _recipe(tmp_path, "data.shots=0")
    task = TASKS["clip_fewshot"](_recipe(tmp_path, "data.class_template=a photo"))
    with pytest.raises(DataError, match=r"data\.class_template: 'a photo' has no \{\} for the class name"):
        task.load_data()
