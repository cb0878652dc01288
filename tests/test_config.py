"""LoraConfig / PeftConfig: defaults as in Hugging Face PEFT, validation when built, and the
``adapter_config.json`` round trip (including files written by real PEFT)."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings

import peft
import pytest

import peftkit
from peftkit import ConfigError, LoraConfig, PeftConfig, TaskType
from peftkit.config import CONFIG_NAME


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _norm(value):
    """Compare values across the two libraries: enums by value, sets as sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # sub-configs (runtime_config, kasa_config)
        return dataclasses.asdict(value)
    return value


# -- defaults ----------------------------------------------------------------------------------------

def test_every_peftkit_field_exists_in_peft():
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    # a peftkit-written file must load in peft without unknown keys
    assert ours - theirs == set()
    # the shared set is substantial (sanity: the comparison below is not vacuous)
    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "init_lora_weights",
            "rank_pattern", "alpha_pattern", "use_dora", "use_rslora", "task_type"} <= ours & theirs


def test_field_defaults_equal_peft():
    ours = {f.name: _field_default(f) for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name: _field_default(f) for f in dataclasses.fields(peft.LoraConfig)}
    shared = sorted(set(ours) & set(theirs))
    diffs = {n: (ours[n], theirs[n]) for n in shared if _norm(ours[n]) != _norm(theirs[n])}
    assert diffs == {}
    assert ours["r"] == 8 and ours["lora_alpha"] == 8 and ours["lora_dropout"] == 0.0
    assert ours["bias"] == "none" and ours["init_lora_weights"] is True and ours["target_modules"] is None


def test_instance_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    shared = {f.name for f in dataclasses.fields(ours)} & {f.name for f in dataclasses.fields(theirs)}
    shared.discard("peft_version")  # peft stamps its own version into the instance
    diffs = {n: (getattr(ours, n), getattr(theirs, n)) for n in sorted(shared)
             if _norm(getattr(ours, n)) != _norm(getattr(theirs, n))}
    assert diffs == {}
    assert ours.peft_type == "LORA"


def test_base_config_defaults_equal_peft():
    ours = {f.name: _field_default(f) for f in dataclasses.fields(PeftConfig)}
    theirs = {f.name: _field_default(f) for f in dataclasses.fields(peft.PeftConfig)}
    assert set(ours) <= set(theirs)
    assert {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]} == {}


def test_mutable_defaults_are_not_shared():
    a, b = LoraConfig(), LoraConfig()
    a.rank_pattern["x"] = 2
    a.alpha_pattern["x"] = 2
    assert b.rank_pattern == {} and b.alpha_pattern == {}


# -- validation --------------------------------------------------------------------------------------

BAD = [
    ("r", {"r": 0}),
    ("r", {"r": -4}),
    ("r", {"r": 4.0}),
    ("r", {"r": "8"}),
    ("r", {"r": True}),
    ("r", {"r": None}),
    ("lora_alpha", {"lora_alpha": 0}),
    ("lora_alpha", {"lora_alpha": -1.5}),
    ("lora_alpha", {"lora_alpha": "16"}),
    ("lora_dropout", {"lora_dropout": -0.1}),
    ("lora_dropout", {"lora_dropout": 1.0}),
    ("lora_dropout", {"lora_dropout": 1.5}),
    ("lora_dropout", {"lora_dropout": "0.1"}),
    ("init_lora_weights", {"init_lora_weights": "kaiming"}),
    ("init_lora_weights", {"init_lora_weights": "PISSA"}),
    ("init_lora_weights", {"init_lora_weights": "pissa_niter_"}),
    ("init_lora_weights", {"init_lora_weights": "pissa_niter_x"}),
    ("init_lora_weights", {"init_lora_weights": None}),
    ("bias", {"bias": "some"}),
    ("bias", {"bias": "ALL"}),
    ("bias", {"bias": None}),
    ("rank_pattern", {"rank_pattern": {"q_proj": 0}}),
    ("rank_pattern", {"rank_pattern": {"q_proj": -2}}),
    ("rank_pattern", {"rank_pattern": {"q_proj": 2.5}}),
    ("rank_pattern", {"rank_pattern": {"q_proj": "4"}}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": 0}}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": -1}}),
    ("task_type", {"task_type": "CLASSIFY"}),
    ("layers_pattern", {"layers_pattern": "layers"}),  # without layers_to_transform (peft rejects it too)
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}={list(k.values())[0]!r}" for f, k in BAD])
def test_invalid_values_raise_naming_the_field(field, kwargs):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    msg = str(info.value)
    assert field in msg
    if field in ("r", "lora_alpha", "lora_dropout", "bias", "init_lora_weights"):
        assert f"LoraConfig.{field}:" in msg  # the field itself, not a substring of another word
    assert isinstance(info.value, ValueError)


def test_bool_rank_pattern_value_rejected_like_r():
    # a JSON `true` in a hand-edited adapter_config.json must not silently become rank 1
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoraConfig(rank_pattern={"q_proj": True})


@pytest.mark.parametrize("kwargs", [
    {"target_modules": r".*\.q_proj", "layers_to_transform": [0]},
    {"target_modules": r".*\.q_proj", "layers_to_transform": 0, "layers_pattern": "layers"},
], ids=["regex+layers_to_transform", "regex+layers_pattern"])
def test_regex_targets_with_layer_filter_rejected_like_peft(kwargs):
    # a regex target never applies the layer filter, so the combination is refused (as peft does)
    with pytest.raises(ValueError):
        peft.LoraConfig(**kwargs)
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert "layers_" in str(info.value)


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_4", "pissa_niter_16", "olora"])
def test_accepted_init_lora_weights(init):
    cfg = LoraConfig(init_lora_weights=init)
    assert cfg.init_lora_weights == init
    expected = int(init.rsplit("_", 1)[1]) if isinstance(init, str) and init.startswith("pissa_niter_") else None
    assert cfg.pissa_niter == expected


@pytest.mark.parametrize("kwargs", [
    {"r": 1}, {"r": 64}, {"lora_alpha": 0.5}, {"lora_alpha": 32}, {"lora_dropout": 0}, {"lora_dropout": 0.0},
    {"lora_dropout": 0.999}, {"bias": "all"}, {"bias": "lora_only"}, {"rank_pattern": {"q_proj": 2}},
    {"alpha_pattern": {"v_proj": 0.5}}, {"task_type": "SEQ_CLS"}, {"peft_type": "lora"},
    {"layers_to_transform": 0, "layers_pattern": "layers"}, {"layers_to_transform": [0, 1]},
])
def test_accepted_values(kwargs):
    cfg = LoraConfig(**kwargs)
    for k, v in kwargs.items():
        if k == "task_type":
            assert cfg.task_type is TaskType(v)
        elif k == "peft_type":
            assert cfg.peft_type == "LORA"
        else:
            assert getattr(cfg, k) == v


def test_target_module_names_become_sets_as_in_peft(tmp_path):
    import peft

    for given in ({"v_proj", "q_proj"}, ["v_proj", "q_proj"]):
        ours, theirs = LoraConfig(target_modules=given), peft.LoraConfig(target_modules=given)
        assert ours.target_modules == theirs.target_modules == {"q_proj", "v_proj"}
        assert type(ours.target_modules) is type(theirs.target_modules) is set
    assert LoraConfig(target_modules="q_proj|v_proj").target_modules == "q_proj|v_proj"  # a regex stays a string
    LoraConfig(target_modules=["v_proj", "q_proj"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == ["q_proj", "v_proj"]  # JSON: a sorted list
    assert LoraConfig.from_pretrained(tmp_path).target_modules == {"q_proj", "v_proj"}


def test_a_config_class_names_its_own_peft_type_as_in_peft():
    import peft

    assert LoraConfig(peft_type="IA3").peft_type == "LORA" and peft.LoraConfig(peft_type="IA3").peft_type == "LORA"


UNSUPPORTED = [
    ("qalora_group_size", 0),  # implemented (test_lora_qalora.py); a group size must be an integer > 0
    ("layer_replication", [[1, 1]]),  # implemented; an empty range is refused (test_lora_layer_replication.py)
    ("loftq_config", {"loftq_bits": 4}),
    ("megatron_config", {"tensor_model_parallel_size": 1}),
    ("target_parameters", "mlp.experts.weight"),  # supported as a list (test_lora_target_parameters.py)
]


@pytest.mark.parametrize("name,value", UNSUPPORTED, ids=[n for n, _ in UNSUPPORTED])
def test_unsupported_peft_fields_raise(name, value):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**{name: value})
    assert name in str(info.value)


def test_loftq_config_none_counts_as_default():
    assert LoraConfig(loftq_config=None).loftq_config is None


# -- to_dict / from_dict -----------------------------------------------------------------------------

def _rich_config() -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
        exclude_modules=["lm_head"], bias="lora_only", use_rslora=True, modules_to_save=["score"],
        init_lora_weights="pissa_niter_4", layers_to_transform=[0, 1], layers_pattern="layers",
        rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 3.5}, use_dora=True,
    )


def test_to_dict_is_json_ready():
    d = _rich_config().to_dict()
    assert d["task_type"] == "CAUSAL_LM" and type(d["task_type"]) is str
    assert d["peft_type"] == "LORA"
    assert d["r"] == 4 and d["rank_pattern"] == {"q_proj": 2}
    assert set(d) == {f.name for f in dataclasses.fields(LoraConfig)} - {"runtime_config"}  # never saved (peft)
    assert json.loads(json.dumps(d)) == d


def test_to_dict_from_dict_round_trip():
    cfg = _rich_config()
    d = cfg.to_dict()
    back = LoraConfig.from_dict(d)
    assert back == cfg
    via_base = PeftConfig.from_dict(json.loads(json.dumps(d)))
    assert type(via_base) is LoraConfig
    assert via_base == cfg
    assert via_base.task_type is TaskType.CAUSAL_LM
    assert via_base.to_dict() == d


def test_from_dict_unknown_keys_warn_and_are_ignored():
    data = {"peft_type": "LORA", "r": 4, "future_knob": 3, "another_one": "x"}
    with pytest.warns(UserWarning) as record:
        cfg = PeftConfig.from_dict(data)
    messages = " ".join(str(w.message) for w in record)
    assert "future_knob" in messages and "another_one" in messages
    assert cfg == LoraConfig(r=4)
    assert not hasattr(cfg, "future_knob")


def test_from_dict_warning_names_source():
    with pytest.warns(UserWarning, match="my_source"):
        LoraConfig.from_dict({"r": 4, "zzz": 1}, source="my_source")


def test_from_dict_missing_keys_take_defaults():
    cfg = PeftConfig.from_dict({"peft_type": "LORA", "r": 16})
    assert type(cfg) is LoraConfig
    assert cfg.r == 16
    expected = LoraConfig(r=16)
    assert cfg == expected
    assert cfg.lora_alpha == 8 and cfg.target_modules is None and cfg.rank_pattern == {}


def test_from_dict_without_peft_type_raises():
    with pytest.raises(ConfigError, match="peft_type"):
        PeftConfig.from_dict({"r": 4})


def test_from_dict_validates():
    with pytest.raises(ConfigError, match="lora_dropout"):
        PeftConfig.from_dict({"peft_type": "LORA", "lora_dropout": 1.0})


# -- files -------------------------------------------------------------------------------------------

PEFT_KWARGS = dict(
    r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
    task_type="CAUSAL_LM", bias="lora_only", use_rslora=True, modules_to_save=["score"],
    init_lora_weights="gaussian", layers_to_transform=[0], layers_pattern="layers",
    rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, use_dora=True, inference_mode=True,
)


def _compare_with_peft(ours: LoraConfig, theirs) -> dict:
    shared = {f.name for f in dataclasses.fields(ours)} & {f.name for f in dataclasses.fields(theirs)}
    diffs = {}
    for n in sorted(shared):
        a, b = _norm(getattr(ours, n)), _norm(getattr(theirs, n))
        if n in ("target_modules", "exclude_modules") and isinstance(a, list):
            a = sorted(a)
        if a != b:
            diffs[n] = (a, b)
    return diffs


def test_from_pretrained_reads_peft_written_config(tmp_path):
    theirs = peft.LoraConfig(**PEFT_KWARGS)
    theirs.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        ours = PeftConfig.from_pretrained(tmp_path)
    assert type(ours) is LoraConfig
    assert _compare_with_peft(ours, theirs) == {}
    assert ours.r == 4 and ours.lora_alpha == 16 and ours.rank_pattern == {"q_proj": 2}
    assert sorted(ours.target_modules) == ["q_proj", "v_proj"]
    assert ours.task_type is TaskType.CAUSAL_LM and ours.inference_mode is True
    assert ours.peft_version == theirs.peft_version


def test_from_pretrained_reads_peft_default_config_and_file_path(tmp_path):
    peft.LoraConfig().save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = LoraConfig.from_pretrained(str(tmp_path))
        b = PeftConfig.from_pretrained(os.path.join(tmp_path, CONFIG_NAME))
    assert a == b
    assert _compare_with_peft(a, peft.LoraConfig()) == {}


def test_from_pretrained_subfolder_and_overrides(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path / "sub")
    cfg = PeftConfig.from_pretrained(tmp_path, subfolder="sub", inference_mode=True)
    assert cfg.r == 4 and cfg.inference_mode is True


def test_saved_config_loads_in_peft(tmp_path):
    ours = _rich_config()
    ours.use_dora = False
    ours.init_lora_weights = "gaussian"
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    diffs = _compare_with_peft(ours, theirs)
    diffs.pop("peft_version", None)
    assert diffs == {}


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        PeftConfig.from_pretrained(tmp_path / "nowhere")
    msg = str(info.value)
    assert os.path.join(str(tmp_path / "nowhere"), CONFIG_NAME) in msg


def test_from_pretrained_not_json(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{ this is not json", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        PeftConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_from_pretrained_json_not_an_object(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        PeftConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize("name,value", [("qalora_group_size", 0), ("layer_replication", [[1, 1]])])
def test_from_pretrained_unsupported_peft_value(tmp_path, name, value):
    peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data[name] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        PeftConfig.from_pretrained(tmp_path)
    assert name in str(info.value)


def test_from_pretrained_unknown_key_warns_with_file(tmp_path):
    LoraConfig(r=2).save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data["brand_new_option"] = 1
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning) as record:
        cfg = PeftConfig.from_pretrained(tmp_path)
    msg = " ".join(str(w.message) for w in record)
    assert "brand_new_option" in msg and str(path) in msg
    assert cfg == LoraConfig(r=2)


def test_save_pretrained_is_atomic(tmp_path):
    cfg = _rich_config()
    cfg.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == [CONFIG_NAME]
    LoraConfig(r=2).save_pretrained(tmp_path)  # overwrite
    assert os.listdir(tmp_path) == [CONFIG_NAME]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["r"] == 2


def test_save_pretrained_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    LoraConfig(r=2).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peftkit.io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(r=16).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [CONFIG_NAME]
    assert (tmp_path / CONFIG_NAME).read_text() == before


def test_save_pretrained_creates_folder_and_extra_keys(tmp_path):
    target = tmp_path / "a" / "b"
    LoraConfig(r=4).save_pretrained(target, base_model_name_or_path="tiny")
    data = json.loads((target / CONFIG_NAME).read_text())
    assert data["r"] == 4 and data["base_model_name_or_path"] == "tiny" and data["peft_type"] == "LORA"
