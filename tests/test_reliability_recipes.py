"""Recipes that would fail late or silently do something else fail before the model loads, naming the field;
the CLI prints the message, not a traceback; a resumed run says what differs from its checkpoint."""

from __future__ import annotations

import pytest
import yaml

from peftkit.cli import main as cli_main
from peftkit.train import RecipeError, load_recipe
from peftkit.train.resume import check_resume, recipe_differences
from peftkit.train.tasks import TASKS

from .train_helpers import text_recipe, write_tsv


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = text_recipe(tmp_path)
    text = path.read_text()
    path.write_text(text + "train:\n  max_steps: 5\n")
    with pytest.raises(RecipeError, match=r"train: duplicate key \(line \d+, first at line \d+\)"):
        load_recipe(str(path))
    path.write_text("method: lora\ntrain:\n  lr: 0.1\n  seed: 1\n  lr: 0.2\n")
    with pytest.raises(RecipeError, match=r"train\.lr: duplicate key \(line 5, first at line 3\)"):
        load_recipe(str(path))
    path.write_text("peft:\n  alpha_pattern:\n    q: 2\n    q: 3\n")
    with pytest.raises(RecipeError, match=r"peft\.alpha_pattern\.q: duplicate key"):
        load_recipe(str(path))


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every: expected a positive integer, got 0"),
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("train.lr=nan", "train.lr: expected a finite number, got nan"),
    ("train.weight_decay=.nan", "train.weight_decay: expected a finite number"),
    ("train.weight_decay=-0.1", "train.weight_decay: expected a number >= 0"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm: expected a finite number"),
    ("train.max_grad_norm=0", "train.max_grad_norm: expected a positive number or null"),
    ("train.loraplus_lr_ratio=-2", "train.loraplus_lr_ratio: expected a positive number or null"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio: expected a finite number"),
    ("train.save_every=-1", "train.save_every: expected 0 (never) or a positive integer, got -1"),
    ("train.eval_every=-5", "train.eval_every: expected 0 (never) or a positive integer, got -5"),
    ("peft.lora_alpha=.inf", "peft: LoraConfig.lora_alpha: expected a finite number, got inf"),
    ("data.labels=[a, a]", "data.labels: 'a' is listed twice"),
    ("data.labels=[only]", "data.labels: expected at least 2 labels"),
    ("data.labels=[true, x]", "data.labels: expected a list of strings or integers"),
    ("data.labels=positive", "data.labels: expected a list"),
    ("data.labels=[a, b];task=causal_lm", "data.labels: only task seq_cls reads it"),
])
def test_bad_values_fail_before_the_model_loads(tmp_path, override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(str(text_recipe(tmp_path)), override.split(";"))
    assert message in str(err.value)


def test_declared_labels_are_read_as_strings_and_checked_against_num_labels(tmp_path):
    recipe = load_recipe(str(text_recipe(tmp_path)), ["data.labels=[0, 1]"])
    assert recipe.data.labels == ["0", "1"]
    with pytest.raises(RecipeError, match=r"num_labels: 3, but data\.labels declares 2"):
        load_recipe(str(text_recipe(tmp_path)), ["data.labels=[0, 1]", "num_labels=3"])


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecipeError, match=r"output_dir: .*afile is a file, not a folder"):
        load_recipe(str(text_recipe(tmp_path)), [f"output_dir={tmp_path / 'afile'}"])
    with pytest.raises(RecipeError, match=r"output_dir: .*afile is a file, not a folder"):
        load_recipe(str(text_recipe(tmp_path)), [f"output_dir={tmp_path / 'afile' / 'run'}"])


def _no_model(monkeypatch):
    loaded = []
    monkeypatch.setattr(TASKS["seq_cls"], "load_model", lambda self: loaded.append(1))
    return loaded


@pytest.mark.parametrize("override", ["train.log_every=0", "train.lr=.nan", "train.save_every=-1",
                                      "peft.lora_alpha=.inf"])
def test_cli_prints_the_message_not_a_traceback(tmp_path, capsys, monkeypatch, override):
    loaded = _no_model(monkeypatch)
    assert cli_main(["train", str(text_recipe(tmp_path)), override]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and override.split("=")[0].split(".")[-1] in err
    assert not loaded


def test_cli_reports_a_bad_data_row_without_a_traceback(tmp_path, capsys, monkeypatch):
    loaded = _no_model(monkeypatch)
    path = text_recipe(tmp_path)
    bad = write_tsv(tmp_path / "bad.tsv", ("text", "label"), [("good", "positive"), ("she said", "no\t1")])
    assert cli_main(["train", str(path), f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv:3: 3 fields, but the header has 2" in err and "Traceback" not in err
    assert not loaded
    from peftkit.train.data import DataError

    with pytest.raises(DataError):  # --debug: the exception itself, with its traceback
        cli_main(["train", "--debug", str(path), f"data.train={bad}"])


def test_cli_duplicate_key_message(tmp_path, capsys):
    path = text_recipe(tmp_path)
    path.write_text(path.read_text() + "train:\n  max_steps: 5\n")
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train: duplicate key" in err and str(path) in err and "Traceback" not in err


def test_recipe_differences_name_what_changed(tmp_path):
    saved = load_recipe(str(text_recipe(tmp_path))).to_dict()
    same = load_recipe(str(text_recipe(tmp_path)),
                       ["resume=true", "train.log_every=3", "train.save_every=2", "tensorboard=true"])
    assert recipe_differences(saved, same.to_dict()) == []
    changed = load_recipe(str(text_recipe(tmp_path)),
                          ["resume=true", "peft.r=8", "train.seed=4", "train.lr=1e-2", "peft.use_dora=true"])
    diffs = recipe_differences(saved, changed.to_dict())
    assert diffs == ["peft.r: 4 in the checkpoint, 8 now", "peft.use_dora: False in the checkpoint, True now",
                     "train.lr: 0.005 in the checkpoint, 0.01 now", "train.seed: 3 in the checkpoint, 4 now"]
    with pytest.raises(RecipeError) as err:
        check_resume(saved, changed, "runs/x/checkpoints/step-0000004")
    msg = str(err.value)
    assert msg.startswith("resume: the recipe differs from runs/x/checkpoints/step-0000004's")
    assert "train.lr: 0.005 in the checkpoint, 0.01 now" in msg and "peft.r" in msg
    check_resume(saved, same, "ckpt")  # nothing that changes the training: no error
    check_resume(None, changed, "ckpt")  # a checkpoint without a saved recipe (older runs): nothing to compare


def test_recipe_to_dict_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(str(text_recipe(tmp_path)), ["data.labels=[negative, positive]"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    again = load_recipe(str(path))
    assert again.to_dict() == recipe.to_dict()
