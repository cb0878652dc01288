"""Bad input is refused with its name: non-finite config numbers (naming the field, and the file of a saved
config), training rows that would change the label set (naming file:line), unreadable data files."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import pytest

import peftkit
from peftkit import ConfigError, LoraConfig, PeftConfig
from peftkit.train.data import DataError
from peftkit.train.recipe import DataSpec, Recipe
from peftkit.train.tasks import TASKS

# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_lora_alpha_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"LoraConfig\.lora_alpha: expected a finite number"):
        LoraConfig(lora_alpha=value)


@pytest.mark.parametrize("field, value, where", [
    ("alpha_pattern", {"q_proj": math.inf}, "alpha_pattern['q_proj']"),
    ("rank_pattern", {"q_proj": 4, "v_proj": math.nan}, "rank_pattern['v_proj']"),
    ("layers_to_transform", [0, math.nan], "layers_to_transform[1]"),
])
def test_non_finite_numbers_inside_lists_and_dicts(field, value, where):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{field: value})
    assert f"LoraConfig.{where}: expected a finite number" in str(err.value)


def _float_fields(cls, base):
    """Every field whose value in a config built from ``base`` is a float, or whose type is a float (``int``
    defaults such as ``lora_alpha: float = 8`` included); ``dict[str, float]`` / ``list[float]`` ones aside."""
    config = cls(**base)
    return [f.name for f in dataclasses.fields(cls)
            if isinstance(getattr(config, f.name), float)
            or ("float" in str(f.type) and not any(k in str(f.type) for k in ("dict", "list", "tuple")))]


def _specs_with_examples():
    out = []
    for spec in peftkit.list_methods():
        for name, kwargs in spec.examples:
            out.append(pytest.param(spec, kwargs, id=f"{spec.name}-{name}"))
    return out


def test_every_method_with_examples_is_covered():
    no_examples = sorted(spec.name for spec in peftkit.list_methods() if not spec.examples)
    assert no_examples == ["composition", "hybrid"]  # configs made of configs, each part validated itself


@pytest.mark.parametrize("spec, kwargs", _specs_with_examples())
def test_every_method_config_builds_and_refuses_non_finite_numbers(spec, kwargs):
    spec.config_cls(**kwargs)  # the registry's examples still build
    for name in _float_fields(spec.config_cls, kwargs):
        for bad in (math.inf, math.nan):
            with pytest.raises(ConfigError) as err:
                spec.config_cls(**{**kwargs, name: bad})
            assert f".{name}" in str(err.value), (name, str(err.value))


def test_the_finite_check_is_one_validator_in_peftconfig():
    @dataclasses.dataclass
    class ToyConfig(PeftConfig):
        PEFT_TYPE = "TOY"
        scale: float = 1.0
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(ConfigError, match=r"ToyConfig\.scale: expected a finite number, got inf"):
        ToyConfig(scale=math.inf)
    with pytest.raises(ConfigError, match=r"ToyConfig\.table\['a'\]\[0\]"):
        ToyConfig(table={"a": [math.nan]})
    assert ToyConfig(scale=2.0, table={"a": [1, 2.5, True, None, "x"]}).scale == 2.0


def test_saved_config_errors_name_the_file(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    data = json.loads(file.read_text())
    data["lora_alpha"] = math.inf  # json writes Infinity, which json.load reads back
    file.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        PeftConfig.from_pretrained(tmp_path)
    assert str(file) in str(err.value) and "lora_alpha" in str(err.value)
    data["lora_alpha"], data["r"] = 8, -1  # any construction error names the file, not only non-finite
    file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"{file}: LoraConfig\.r"):
        LoraConfig.from_pretrained(tmp_path)


def test_from_json_file_returns_the_dict_and_names_the_file(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    assert PeftConfig.from_json_file(str(file))["r"] == 4  # peft's classmethod: the file's JSON object
    file.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{file}: not valid JSON"):
        PeftConfig.from_json_file(str(file))
    with pytest.raises(ConfigError, match=rf"{file}: not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ data

POS = ["good film", "great fun", "lovely", "superb cast", "happy ending"]
NEG = ["bad film", "awful", "dull plot", "sad mess", "weak cast"]


def _rows(n=40):
    return [(POS[i % 5], "positive") if i % 2 else (NEG[i % 5], "negative") for i in range(n)]


def _write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return str(path)


def _tsv(rows, header="text\tlabel"):
    return header + "\n" + "".join("\t".join(r) + "\n" for r in rows)


def _load(train, test=None, bad_rows="fail", labels=None):
    recipe = Recipe(data=DataSpec(train=train, test=test, text_column="text", label_column="label",
                                  bad_rows=bad_rows, labels=labels))
    task = TASKS["seq_cls"](recipe)
    task.load_data()
    return task


def test_a_tsv_row_with_an_extra_tab_is_a_bad_row(tmp_path):
    train = _write(tmp_path / "train.tsv", _tsv(_rows(4)) + "she said\tno\t1\n")
    with pytest.raises(DataError, match=r"train\.tsv:6: 3 fields, but the header has 2"):
        _load(train)
    task = _load(train, bad_rows="skip")
    assert task.labels == ["negative", "positive"] and task.n_train == 4
    assert any("train.tsv: skipped 1 rows: line 6 (3 fields" in note for note in task.notes)


def test_an_unquoted_comma_in_a_csv_is_a_bad_row(tmp_path):
    text = "text,label\n" + "".join(f"{t},{y}\n" for t, y in _rows(4)) + "bad, but good,positive\n"
    train = _write(tmp_path / "train.csv", text)
    with pytest.raises(DataError, match=r"train\.csv:6: 3 fields, but the header has 2"):
        _load(train)
    quoted = _write(tmp_path / "ok.csv", text.replace("bad, but good", '"bad, but good"'))
    assert _load(quoted).labels == ["negative", "positive"]


def test_a_short_row_is_a_bad_row(tmp_path):
    train = _write(tmp_path / "train.tsv", "text\tlabel\textra\n" + "".join(f"{t}\t{y}\tx\n" for t, y in _rows(4))
                   + "fine\tpositive\n")
    with pytest.raises(DataError, match=r"train\.tsv:6: 2 fields, but the header has 3"):
        _load(train)


def test_a_typo_label_in_train_does_not_add_a_class(tmp_path):
    rows = _rows(40)
    rows[7] = ("great fun", "postive")
    train = _write(tmp_path / "train.tsv", _tsv(rows))
    with pytest.raises(DataError, match=r"train\.tsv:9: label 'postive' .*looks like a typo of 'positive'"):
        _load(train)
    task = _load(train, bad_rows="skip")
    assert task.labels == ["negative", "positive"] and task.n_train == 39
    # declared, the typo is a label outside the declared set
    declared = r"label 'postive' is not one of the known labels .*\(declared in data\.labels\)"
    with pytest.raises(DataError, match=r"train\.tsv:9: " + declared):
        _load(train, labels=["negative", "positive"])


def test_a_case_variant_label_is_reported(tmp_path):
    rows = _rows(10)
    rows[3] = ("great fun", "Positive")
    rows[5] = ("lovely", "Positive")
    train = _write(tmp_path / "train.tsv", _tsv(rows))
    with pytest.raises(DataError, match=r"train\.tsv:5: label 'Positive' .*'positive'"):
        _load(train)


def test_distinct_small_classes_are_not_typos(tmp_path):
    rows = _rows(40) + [("meh", "class_2")]
    rows[0] = ("x", "class_1")
    task = _load(_write(tmp_path / "train.tsv", _tsv(rows)))
    assert task.labels == ["class_1", "class_2", "negative", "positive"]
    task = _load(_write(tmp_path / "small.tsv", _tsv([("good", "pos"), ("bad", "neg"), ("fine", "pos")])))
    assert task.labels == ["neg", "pos"]


def _jsonl(rows):
    return "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)


@pytest.mark.parametrize("bad, kind", [(1.0, "a float"), (True, "a boolean"), ([1], "a list"), ({"a": 1}, "an object")])
def test_jsonl_labels_must_be_strings_or_integers(tmp_path, bad, kind):
    train = _write(tmp_path / "train.jsonl", _jsonl([("good", 1), ("bad", 0), ("fine", bad), ("meh", 0)]))
    with pytest.raises(DataError, match=rf"train\.jsonl:3: label {bad!r} is {kind}".replace("[", r"\[")):
        _load(train)
    task = _load(train, bad_rows="skip")
    assert task.labels == ["0", "1"] and task.n_train == 3


def test_jsonl_integer_labels_and_declared_labels(tmp_path):
    train = _write(tmp_path / "train.jsonl", _jsonl([("good", 1), ("bad", 0), ("fine", 1)]))
    assert _load(train).labels == ["0", "1"]
    task = _load(train, labels=["1", "0"])  # declared: that order is the class index
    assert task.labels == ["1", "0"] and task.train_y == [0, 1, 0]


def test_declared_labels_fix_the_set_and_the_test_set_is_checked(tmp_path):
    train = _write(tmp_path / "train.tsv", _tsv([("good", "positive"), ("bad", "negative")]))
    test = _write(tmp_path / "test.tsv", _tsv([("ok", "neutral"), ("fine", "positive"), ("hm", "unknown")]))
    task = _load(train, labels=["negative", "neutral", "positive"])
    assert task.labels == ["negative", "neutral", "positive"] and task.train_y == [2, 0]
    declared = r"label 'unknown' is not one of the known labels .*\(declared in data\.labels\)"
    with pytest.raises(DataError, match=r"test\.tsv:4: " + declared):
        _load(train, test, labels=["negative", "neutral", "positive"])
    # inferred from train only: a test label outside them is an error even when bad rows are skipped
    inferred = r"label 'neutral' is not one of the known labels .*\(inferred from .*train\.tsv"
    with pytest.raises(DataError, match=r"test\.tsv:2: " + inferred):
        _load(train, test, bad_rows="skip")


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    for name, body in (("train.tsv", _tsv(_rows(4)).encode()), ("train.jsonl", _jsonl(_rows(4)).encode())):
        path = _write(tmp_path / name, body + b"caf\xe9\tpositive\n" if name.endswith("tsv")
                      else body + b'{"text": "caf\xe9", "label": "positive"}\n')
        with pytest.raises(DataError, match=rf"{name.replace('.', r'[.]')}:{6 if name.endswith('tsv') else 5}: "
                                            r"not valid UTF-8"):
            _load(path)


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    train = _write(tmp_path / "train.tsv", "\ufeff" + _tsv(_rows(4)))
    assert _load(train).n_train == 4


def test_a_field_over_the_csv_limit_names_the_file_and_line(tmp_path):
    import csv

    huge = "x" * (csv.field_size_limit() + 10)
    train = _write(tmp_path / "train.csv", "text,label\ngood,positive\n" + f"{huge},negative\n")
    with pytest.raises(DataError, match=r"train\.csv:3: .*field larger than field limit"):
        _load(train)


def test_a_corrupt_gzip_file_names_the_file(tmp_path):
    bad = _write(tmp_path / "train.tsv.gz", b"this is not gzip data")
    with pytest.raises(DataError, match=r"train\.tsv\.gz: not a readable gzip file"):
        _load(bad)
    whole = gzip.compress(_tsv(_rows(400)).encode())
    cut = _write(tmp_path / "cut.tsv.gz", whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.tsv\.gz: not a readable gzip file"):
        _load(cut)
    good = _write(tmp_path / "good.jsonl.gz", gzip.compress(_jsonl(_rows(4)).encode()))
    assert _load(good).n_train == 4
