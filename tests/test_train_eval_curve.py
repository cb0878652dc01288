"""Evaluation curves: with ``data.dev`` the trainer evaluates the dev rows every ``train.eval_every`` steps and logs
them; the plot draws the train loss, every measured evaluation point (markers only) and the final test metric as
an annotation, and the summary reports the last dev metric apart from the test metric."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.report import plot_metrics, plot_series, summary_table

from .train_helpers import tiny_llama_dir

ROWS = [("which fruit is red?", "apple"), ("name a yellow fruit", "a banana"), ("green?", "lime"),
        ("sky", "blue most days"), ("is snow cold?", "yes"), ("count to three", "one two three")]


def _recipe(tmp_path, data=None, train_over=None, **top):
    for name, part in (("train", ROWS), ("test", ROWS[:2]), ("dev", ROWS[3:])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in part)
    recipe = {
        "model": tiny_llama_dir(tmp_path), "task": "causal_lm", "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "train.jsonl", "test": "test.jsonl", "dev": "dev.jsonl", "text_column": "prompt",
                 "response_column": "response", "max_length": 24, **(data or {})},
        "train": {"max_steps": 6, "batch_size": 3, "lr": 1e-2, "log_every": 1, "save_every": 0, "eval_every": 2,
                  "num_threads": 1, **(train_over or {})},
        "output_dir": str(tmp_path / "run"), **top,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(tmp_path / "r.yaml"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    summary = train(_recipe(tmp), quiet=True)
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp, summary, records


def test_dev_points_logged_every_eval_every_steps(run):
    _, summary, records = run
    dev = [r for r in records if r.get("event") == "dev"]
    assert [r["step"] for r in dev] == [2, 4, 6]
    assert all(set(r) == {"step", "event", "dev_loss", "dev_perplexity"} for r in dev)
    assert len({r["dev_loss"] for r in dev}) == 3  # measured after different amounts of training
    tests = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in tests] == [0, 6]  # the test split: before and after only
    assert summary["dev_loss"] == dev[-1]["dev_loss"] and summary["dev_step"] == 6 and summary["dev_evals"] == 3
    assert summary["test_loss"] == tests[-1]["test_loss"] != summary["dev_loss"]


def test_plot_series_has_each_measured_point_and_final_test_apart(run):
    tmp, summary, records = run
    series = plot_series(records, "test_loss")
    dev = [r for r in records if r.get("event") == "dev"]
    assert series["dev"] == ([2, 4, 6], [r["dev_loss"] for r in dev])
    assert series["train"][0] == [1, 2, 3, 4, 5, 6]
    assert series["evals"] == ([0], [summary["before_test_loss"]])  # the final test value is not a curve point
    assert series["final"] == (6, summary["test_loss"])
    drawn = plot_metrics(records, str(tmp / "again.png"), "test_loss")
    assert drawn == series and (tmp / "again.png").stat().st_size > 0
    assert (tmp / "run" / "metrics.png").is_file()
    assert re.search(rf"dev_loss \(step 6\) +{summary['dev_loss']:.4f}\n", summary_table(summary))


def test_plot_draws_markers_without_joining_lines(run, monkeypatch):
    import matplotlib.axes

    tmp, _, records = run
    calls = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_metrics(records, str(tmp / "spy.png"), "test_loss")
    points = [(a, k) for a, k in calls if k.get("label") in ("dev_loss", "test_loss")]
    assert [k["label"] for _, k in points] == ["test_loss", "dev_loss"]
    assert all(k["linestyle"] == "none" for _, k in points)
    assert list(points[1][0][0]) == [2, 4, 6]


def test_eval_every_zero_gives_one_dev_point_at_the_end(tmp_path):
    train(_recipe(tmp_path, train_over={"max_steps": 3, "eval_every": 0}), quiet=True)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "dev"] == [3]


@pytest.mark.parametrize("data, top, message", [
    ({"dev": "missing.jsonl"}, {}, r"^data\.dev: file not found: missing\.jsonl"),
    ({"dev": None, "dev_rows": 2}, {}, r"^data\.dev_rows: only read with data\.dev set"),
    ({"dev_rows": 0}, {}, r"^data\.dev_rows: expected a positive integer or null, got 0"),
    ({}, {"task": "seq_cls"}, r"^data\.dev: only task causal_lm reads it \(task seq_cls\)"),
])
def test_dev_recipe_errors(tmp_path, data, top, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(tmp_path, data=data, **top)
