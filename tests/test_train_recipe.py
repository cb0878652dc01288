"""Recipes and data checks of `peftkit train`: bad input fails before a model loads, naming the field or line."""

from __future__ import annotations

import pytest
import yaml

from peftkit.cli import main as cli_main
from peftkit.train import RecipeError, load_recipe
from peftkit.train.data import DataError
from peftkit.train.recipe import parse_overrides
from peftkit.train.state import lr_factor
from peftkit.train.tasks import TASKS

from .train_helpers import text_recipe, write_tsv


def test_default_recipe_is_lora_on_sst2_with_the_minilm():
    r = load_recipe()
    assert (r.model, r.task, r.method) == ("minilm", "seq_cls", "lora")
    assert r.data.train == "builtin:sst2/train" and r.data.test == "builtin:sst2/test"
    assert r.peft["target_modules"] == "all-linear"


def test_overrides_are_typed_and_nested(tmp_path):
    r = load_recipe(str(text_recipe(tmp_path)), ["train.lr=1e-4", "peft.r=16", "train.bf16=true", "train.max_grad_norm=null"])
    assert r.train.lr == 1e-4 and isinstance(r.train.lr, float)
    assert r.peft["r"] == 16 and r.train.bf16 is True and r.train.max_grad_norm is None
    assert parse_overrides(["a.b=3"]) == [("a.b", 3)]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer"),
        ("train.batch_size=0", "train.batch_size: expected a positive integer"),
        ("task=regression", "task: expected one of"),
        ("method=nonesuch", "method: unknown method 'nonesuch'"),
        ("peft.rank=4", "peft.rank: not a field of LoraConfig"),
        ("peft.r=-1", "peft: LoraConfig.r"),
        ("data.train=missing.tsv", "data.train: file not found: missing.tsv"),
        ("data.bad_rows=ignore", "data.bad_rows: expected one of fail, skip"),
        ("bogus=1", "bogus: unknown key"),
    ],
)
def test_bad_recipe_names_the_field(tmp_path, override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(str(text_recipe(tmp_path)), [override])
    assert message in str(err.value)


def test_cli_rejects_bad_recipe_before_loading_a_model(tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(TASKS["seq_cls"], "load_model", lambda self: loaded.append(1))
    path = text_recipe(tmp_path)
    assert cli_main(["train", str(path), "train.lr=fast"]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err
    assert not loaded and not (tmp_path / "run").exists()


def test_recipe_file_with_nested_unknown_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_file": "x.tsv"}}))
    with pytest.raises(RecipeError, match=r"data\.train_file: unknown key"):
        load_recipe(str(path))


def _task(tmp_path, rows, bad_rows="fail"):
    recipe = load_recipe(str(text_recipe(tmp_path)), [f"data.bad_rows={bad_rows}"])
    recipe.data.train = write_tsv(tmp_path / "train.tsv", ("text", "label"), rows)
    recipe.data.test = None
    task = TASKS["seq_cls"](recipe)
    task.load_data()
    return task


def test_string_labels_are_inferred_and_sorted(tmp_path):
    task = _task(tmp_path, [("good", "pos"), ("bad", "neg"), ("fine", "pos")])
    assert task.labels == ["neg", "pos"] and task.train_y == [1, 0, 1]


def test_bad_rows_fail_with_the_line_number(tmp_path):
    with pytest.raises(DataError, match=r"train\.tsv:3: missing label column 'label'"):
        _task(tmp_path, [("good", "pos"), ("bad", ""), ("fine", "pos")])


def test_bad_rows_skip_reports_count_and_lines(tmp_path):
    task = _task(tmp_path, [("good", "pos"), ("bad", ""), ("fine", "pos"), ("meh", "neg")], bad_rows="skip")
    assert task.n_train == 3
    assert any("skipped 1 rows: line 3" in note for note in task.notes)


def test_test_label_outside_the_training_set(tmp_path):
    recipe = load_recipe(str(text_recipe(tmp_path)))
    recipe.data.test = write_tsv(tmp_path / "test2.tsv", ("text", "label"), [("ok", "positive"), ("hm", "neutral")])
    with pytest.raises(DataError, match=r"test2\.tsv:3: label 'neutral' is not one of the known labels"):
        TASKS["seq_cls"](recipe).load_data()


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0


def test_every_shipped_recipe_is_valid():
    import glob
    import os

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(paths) >= 15
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.task in TASKS, path


def test_resume_reads_fields_added_after_the_checkpoint_as_their_defaults():
    """A checkpoint's recipe written before a field existed (e.g. ``data.packing``) resumes when the current recipe
    keeps that field's default, and is refused naming the field when it does not."""
    from peftkit.train.recipe import Recipe
    from peftkit.train.resume import recipe_differences

    saved = Recipe().to_dict()
    del saved["data"]["packing"], saved["train"]["ce_chunk_size"], saved["grpo"]
    assert recipe_differences(saved, Recipe().to_dict()) == []
    changed = Recipe()
    changed.data.packing = True
    assert recipe_differences(saved, changed.to_dict()) == ["data.packing: False in the checkpoint, True now"]
