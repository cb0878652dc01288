"""`peftkit train` with Hugging Face data sets (local ones: the hub is not reachable in tests) and TensorBoard."""

from __future__ import annotations

import json
import os

import pytest

from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.data import DataError, parse_hf, read_table
from peftkit.train.tasks import TASKS

from .train_helpers import sentiment_rows, text_recipe


def _saved_dataset(root, rows_by_split):
    """A DatasetDict with a ClassLabel column written by ``save_to_disk``."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    data = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"text": [t for t, _ in rows], "label": [1 if y == "positive" else 0 for _, y in rows]},
            features=features)
        for split, rows in rows_by_split.items()})
    path = str(root / "hf_sst")
    data.save_to_disk(path)
    return path


def test_parse_hf_sources():
    assert parse_hf("hf:stanfordnlp/sst2@train") == ("stanfordnlp/sst2", None, "train")
    assert parse_hf("hf:glue:sst2@validation") == ("glue", "sst2", "validation")
    with pytest.raises(DataError, match=r"hf:glue: expected hf:PATH\[:CONFIG\]@SPLIT"):
        parse_hf("hf:glue")


def test_class_labels_read_as_names_with_row_numbers(tmp_path):
    path = _saved_dataset(tmp_path, {"train": [("good film", "positive"), ("dull", "negative")]})
    table = read_table(f"hf:{path}@train")
    assert [r["label"] for r in table.rows] == ["positive", "negative"] and table.lines == [1, 2]
    assert read_table(f"hf:{path}@train", limit=1).rows == [{"text": "good film", "label": "positive"}]
    with pytest.raises(DataError, match=r"no split 'test'; the data set has \['train'\]"):
        read_table(f"hf:{path}@test")


def test_local_data_files_folder(tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    table = read_table(f"hf:{folder}@train")
    assert [(r["text"], r["label"]) for r in table.rows] == [("good", "pos"), ("bad", "neg"), ("fine", "pos")]


def test_unloadable_source_names_it(tmp_path):
    with pytest.raises(DataError, match=r"hf:.*missing@train: cannot load the data set"):
        read_table(f"hf:{tmp_path / 'missing'}@train")


def test_recipe_rejects_a_malformed_hf_source(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.train: hf:sst2: expected hf:PATH"):
        load_recipe(str(text_recipe(tmp_path)), ["data.train=hf:sst2"])


def test_seq_cls_task_trains_from_a_saved_dataset(tmp_path):
    path = _saved_dataset(tmp_path, {"train": sentiment_rows(32, 0), "test": sentiment_rows(8, 1)})
    recipe = load_recipe(str(text_recipe(tmp_path)), [f"data.train=hf:{path}@train", f"data.test=hf:{path}@test"])
    task = TASKS["seq_cls"](recipe)
    task.load_data()
    assert task.labels == ["negative", "positive"] and task.n_train == 32
    expected = [1 if y == "positive" else 0 for _, y in sentiment_rows(32, 0)]
    assert task.train_y == expected


def test_tensorboard_gets_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(str(text_recipe(tmp_path)), ["tensorboard=true", "train.save_every=0"])
    train(recipe, quiet=True)
    folder = os.path.join(recipe.output_dir, "tensorboard")
    acc = EventAccumulator(folder)
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    with open(os.path.join(recipe.output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    expected = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert logged.keys() == expected.keys() == {2, 4, 6, 8, 10, 12}
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-6)
    assert [e.step for e in acc.Scalars("train/lr")] == sorted(expected)
