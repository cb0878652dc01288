"""``peftkit bench``: a tiny grid against Hugging Face peft writes the right files with the right numbers."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys

import pytest

from peftkit import get_peft_model
from peftkit.bench import measure, report
from peftkit.bench.grid import MODELS, cell_config, resolve_methods
from peftkit.bench.peft_side import peft_config_class
from peftkit.cli import main
from peftkit.registry import get_method

KEYS = {"method", "model", "impl", "trainable_params", "trainable_pct", "adapter_bytes", "step_time_s",
        "peak_mem_mb", "tensor_peak_mb", "infer_unmerged_s", "infer_merged_s", "accuracy"}
ARGS = ["bench", "--methods", "lora,bitfit", "--models", "llama-tiny", "--vs-peft", "--steps", "2", "--reps", "2",
        "--batch", "2", "--seq", "8", "--infer-iters", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main([*ARGS, "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    return out, {(r["method"], r["impl"]): r for r in records}, records


def _files_size(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def test_records_have_every_field_and_measured_values(run):
    _, by, records = run
    assert len(records) == 4 and all(KEYS <= set(r) for r in records)
    for impl in ("peftkit", "peft"):
        r = by["lora", impl]
        assert r["model"] == "llama-tiny" and r["skipped"] is None and r["accuracy"] is None
        for key in ("step_time_s", "peak_mem_mb", "infer_unmerged_s", "infer_merged_s"):
            assert len(r["samples"][key]) == 2  # one sample per repetition
            assert r[key] == statistics.median(r["samples"][key]) and r[key] > 0
        assert len(r["samples"]["tensor_peak_mb"]) == 1 and r["tensor_peak_mb"] > 0  # exactly repeatable: once


def test_trainable_params_and_adapter_bytes_match_the_model(run, tmp_path):
    import peft

    _, by, _ = run
    config, _ = cell_config(resolve_methods("lora")[0], MODELS["llama-tiny"], None)
    assert config == {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM"}  # the registry's example
    ours = get_peft_model(MODELS["llama-tiny"].build(), get_method("lora").config_cls(**config))
    theirs = peft.get_peft_model(MODELS["llama-tiny"].build(), peft.LoraConfig(**config))
    for impl, model in (("peftkit", ours), ("peft", theirs)):
        trainable, total = model.get_nb_trainable_parameters()
        rec = by["lora", impl]
        assert rec["trainable_params"] == trainable
        assert rec["trainable_pct"] == pytest.approx(100 * trainable / total)
        model.save_pretrained(tmp_path / impl)
        assert rec["adapter_bytes"] == _files_size(tmp_path / impl)
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4)
    assert by["lora", "peftkit"]["trainable_params"] == 2 * (256 + 256 + 256 + 128)


def test_not_applicable_and_missing_counterpart_are_skipped_with_the_reason(run):
    _, by, _ = run
    ours, theirs = by["bitfit", "peftkit"], by["bitfit", "peft"]
    assert ours["skipped"].startswith("NotApplicableError") and "no bias" in ours["skipped"]
    assert "has no BitFitConfig" in theirs["skipped"]
    for r in (ours, theirs):
        assert all(r[k] is None for k in KEYS - {"method", "model", "impl"})


def test_ratios_are_medians_of_per_repetition_ratios(run):
    out, by, _ = run
    ratios = json.loads((out / "ratios.json").read_text())
    assert [(r["method"], r["model"]) for r in ratios] == [("lora", "llama-tiny")]  # skipped cells: no ratio
    r = ratios[0]
    ours, theirs = by["lora", "peftkit"]["samples"], by["lora", "peft"]["samples"]
    for name, key in (("step_time_ratio", "step_time_s"), ("peak_mem_ratio", "peak_mem_mb"),
                      ("tensor_peak_ratio", "tensor_peak_mb"), ("infer_unmerged_ratio", "infer_unmerged_s")):
        per_rep = [o / t for o, t in zip(ours[key], theirs[key])]
        assert r[name] == pytest.approx(statistics.median(per_rep))
        assert r[name + "_spread"] == pytest.approx([min(per_rep), max(per_rep)])
    assert r["reps"] == 2 and r["trainable_params_equal"] is True


def test_tensor_peak_is_the_most_tensor_bytes_held_at_once():
    import torch

    def work():
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(500_000)  # 2 MB: 3 MB live
        del a
        c = torch.empty(400_000)  # 1.6 MB: 3.6 MB live, the peak
        del b, c
        return torch.empty(100_000)  # freed when the caller drops it

    assert measure.tensor_peak_bytes(work) == 4 * (500_000 + 400_000)
    before = [torch.empty(1_000_000)]  # live before: neither its bytes nor its free enter the figure

    def free_and_allocate():
        before.clear()
        return torch.empty(100)

    assert measure.tensor_peak_bytes(free_and_allocate) == 400


def test_markdown_and_charts_are_written_and_regenerate_from_json(run, capsys):
    out, _, _ = run
    md = (out / "results.md").read_text()
    assert md.startswith(report.BEGIN) and md.rstrip().endswith(report.END)
    assert "| lora | llama-tiny | peftkit | 1,792 |" in md
    assert "skipped: NotApplicableError: BitFit" in md and "### peftkit / peft" in md
    for png in ("tradeoff.png", "step_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "results.md").write_text("stale")
    assert report.main([str(out)]) == 0
    assert (out / "results.md").read_text() == md


@pytest.mark.parametrize("flag, bad, valid", [("--methods", "lora,nope", "dora"), ("--models", "gpt5", "vit-tiny")])
def test_unknown_names_fail_with_the_valid_ones(flag, bad, valid, capsys):
    assert main(["bench", flag, bad]) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and bad.split(",")[-1] in err and valid in err


def test_vs_peft_without_peft_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert main(["bench", "--methods", "lora", "--models", "bert-tiny", "--vs-peft"]) == 2
    assert "pip install peft" in capsys.readouterr().err


def test_peft_counterpart_is_the_config_class_of_the_same_name():
    import peft

    assert peft_config_class(peft, get_method("lora")) is peft.LoraConfig
    assert peft_config_class(peft, get_method("ln_tuning")) is peft.LNTuningConfig
    assert peft_config_class(peft, get_method("bitfit")) is None


def test_accuracy_fine_tunes_the_methods_sst2_recipe_for_the_given_steps(tmp_path):
    from peftkit.bench.run import Options, accuracy

    data = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data" / "sst2"
    (tmp_path / "sst2_lora.yaml").write_text(
        "model: minilm\ntask: seq_cls\nmethod: lora\npeft: {r: 2, lora_alpha: 4, target_modules: [query]}\n"
        f"data: {{train: {data / 'train.tsv'}, test: {data / 'test.tsv'}, train_rows: 16, test_rows: 8, "
        "max_length: 16}\ntrain: {max_steps: 600, batch_size: 4, eval_batch_size: 8}\noutput_dir: unused\n")
    opts = Options(configs_dir=str(tmp_path), accuracy_steps=2, threads=1)
    acc = accuracy(resolve_methods("lora")[0], opts, str(tmp_path / "run"))
    summary = json.loads(next((tmp_path / "run").rglob("summary.json")).read_text())
    assert summary["steps"] == 2 and summary["method"] == "lora"  # max_steps overridden, the recipe's method
    assert acc == summary["test_accuracy"] and acc * 8 == round(acc * 8)  # 8 test sentences
    assert accuracy(resolve_methods("ia3")[0], opts, str(tmp_path / "none")) is None  # no sst2_ia3.yaml here


def test_an_implementation_that_merges_but_cannot_unmerge_trains_on_a_fresh_model():
    """peft's OSF merges but raises on unmerge: the merged forward is timed once, then the side rebuilds."""
    from peftkit.bench.run import Options, _Side

    bench_model = MODELS["llama-tiny"]
    built = []

    def build():
        model = get_peft_model(bench_model.build(), get_method("lora").config_cls(r=2, task_type="CAUSAL_LM"))

        def refuse():
            raise NotImplementedError("no unmerging")

        model.unmerge_adapter = refuse
        built.append(model)
        return model

    side = _Side("peft", build, bench_model, Options(steps=1, reps=2, infer_iters=1, batch=2, seq=8, memory=False))
    side.repetition(mergeable=True)
    assert side.samples["infer_merged_s"][0] > 0 and not side.can_merge and len(built) == 2
    assert side.model is built[1] and side.model.training
    side.repetition(mergeable=True)
    assert side.samples["infer_merged_s"][1] is None and len(built) == 2 and len(side.samples["step_time_s"]) == 2
