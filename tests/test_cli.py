"""The CLI reads the registry; the README's method table is the generated one."""

from __future__ import annotations

import pathlib

from peftkit import LoraConfig, get_peft_model
from peftkit.cli import TABLE_BEGIN, TABLE_END, main, methods_markdown

from .families import FAMILY

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_method_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    table = readme.split(TABLE_BEGIN)[1].split(TABLE_END)[0].strip()
    assert table == methods_markdown()


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "lora" in names and names == sorted(names)


def test_inspect_summarises_an_adapter(tmp_path, capsys):
    family = FAMILY["llama"]
    get_peft_model(family.model(), LoraConfig(r=4, use_dora=True)).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method: LORA" in out and "use_dora: True" in out
    # 2 layers: q (A 4x32, B 32x4, m 32) + v (A 4x32, B 16x4, m 16)
    assert f"parameters: {2 * (128 + 128 + 32 + 128 + 64 + 16):,d}" in out


def test_inspect_rejects_a_missing_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_is_a_subcommand_with_its_options(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--methods", "--models", "--vs-peft", "--reps", "--accuracy", "--out"))
