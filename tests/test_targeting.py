"""Module selection follows Hugging Face PEFT: the same config selects the same modules, with the same
per-module rank and scaling, on the tiny model families."""

from __future__ import annotations

import peft
import pytest
from peft.utils.other import get_pattern_key

import peftkit
from peftkit.targeting import TargetError, model_family, pattern_value

from .families import FAMILY


def kit_selected(family: str, **kwargs) -> list[str]:
    pm = peftkit.get_peft_model(FAMILY[family].model(), peftkit.LoraConfig(**kwargs))
    return sorted(p for p, _ in pm.base_model.adapter_layers())


def ref_selected(family: str, **kwargs) -> list[str]:
    pm = peft.get_peft_model(FAMILY[family].model(), peft.LoraConfig(**kwargs))
    return sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


L = "model.layers"
B = "bert.encoder.layer"

# (family, config kwargs, the exact expected selection (peftkit and peft must both give it)
CASES = [
    ("llama-suffix", "llama", {"target_modules": ["q_proj"]},
     [f"{L}.{i}.self_attn.q_proj" for i in (0, 1)]),
    ("llama-exact-path", "llama", {"target_modules": [f"{L}.0.self_attn.q_proj"]},
     [f"{L}.0.self_attn.q_proj"]),
    ("llama-dotted-suffix", "llama", {"target_modules": ["mlp.up_proj", "self_attn.o_proj"]},
     sorted(f"{L}.{i}.{m}" for i in (0, 1) for m in ("mlp.up_proj", "self_attn.o_proj"))),
    ("llama-partial-name-no-match", "llama", {"target_modules": ["proj", "q_proj"]},
     [f"{L}.{i}.self_attn.q_proj" for i in (0, 1)]),
    ("llama-regex", "llama", {"target_modules": r".*\.layers\.0\.self_attn\.(q|v)_proj"},
     [f"{L}.0.self_attn.q_proj", f"{L}.0.self_attn.v_proj"]),
    ("llama-regex-fullmatch", "llama", {"target_modules": r"layers\.1\..*_proj"}, None),  # must fullmatch: nothing
    ("llama-all-linear", "llama", {"target_modules": "all-linear"},
     sorted(f"{L}.{i}.{m}" for i in (0, 1) for m in (
         "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))),
    ("llama-ALL-LINEAR", "llama", {"target_modules": "ALL-LINEAR"}, 14),
    ("llama-all-linear-exclude-list", "llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "k_proj"]},
     10),
    ("llama-exclude-regex", "llama",
     {"target_modules": ["q_proj", "v_proj", "o_proj"], "exclude_modules": r".*\.layers\.1\..*"},
     [f"{L}.0.self_attn.o_proj", f"{L}.0.self_attn.q_proj", f"{L}.0.self_attn.v_proj"]),
    ("llama-exclude-regex-fullmatch", "llama", {"target_modules": ["q_proj"], "exclude_modules": r"q_proj"},
     [f"{L}.{i}.self_attn.q_proj" for i in (0, 1)]),
    ("llama-layers-int", "llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1},
     [f"{L}.1.self_attn.q_proj", f"{L}.1.self_attn.v_proj"]),
    ("llama-layers-list-pattern", "llama",
     {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
     [f"{L}.0.self_attn.q_proj", f"{L}.0.self_attn.v_proj"]),
    ("llama-layers-pattern-list", "llama",
     {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
     [f"{L}.1.self_attn.q_proj"]),
    ("llama-layers-both", "llama", {"target_modules": ["q_proj"], "layers_to_transform": [0, 1]},
     [f"{L}.{i}.self_attn.q_proj" for i in (0, 1)]),
    ("llama-layers-empty-list", "llama", {"target_modules": ["q_proj"], "layers_to_transform": []},
     [f"{L}.{i}.self_attn.q_proj" for i in (0, 1)]),
    ("llama-layers-exact-path-bypasses-filter", "llama",
     {"target_modules": [f"{L}.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
     [f"{L}.0.self_attn.q_proj", f"{L}.1.self_attn.v_proj"]),
    ("llama-default", "llama", {},
     sorted(f"{L}.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj"))),
    ("gpt2-default", "gpt2", {}, [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]),
    ("gpt2-all-linear", "gpt2", {"target_modules": "all-linear"},
     sorted(f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
    ("gpt2-ambiguous-suffix", "gpt2", {"target_modules": ["c_proj"]},
     sorted(f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_proj", "mlp.c_proj"))),
    ("gpt2-layers-pattern", "gpt2",
     {"target_modules": ["c_attn", "mlp.c_proj"], "layers_to_transform": [1], "layers_pattern": "h"},
     ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]),
    ("gpt2-layers-int", "gpt2", {"target_modules": ["c_fc"], "layers_to_transform": 0},
     ["transformer.h.0.mlp.c_fc"]),
    ("bert-default", "bert", {"task_type": "SEQ_CLS"},
     sorted(f"{B}.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value"))),
    ("bert-all-linear-seqcls", "bert", {"task_type": "SEQ_CLS", "target_modules": "all-linear"},
     sorted([f"{B}.{i}.{m}" for i in (0, 1) for m in (
         "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")] + ["bert.pooler.dense"])),
    ("bert-all-linear-exclude-regex", "bert",
     {"task_type": "SEQ_CLS", "target_modules": "all-linear", "exclude_modules": r".*(pooler|intermediate).*"},
     10),
    ("bert-exclude-list", "bert",
     {"task_type": "SEQ_CLS", "target_modules": ["dense"], "exclude_modules": ["attention.output.dense"]},
     sorted([f"{B}.{i}.{m}" for i in (0, 1) for m in ("intermediate.dense", "output.dense")] + ["bert.pooler.dense"])),
    ("bert-layers-int-pattern", "bert",
     {"task_type": "SEQ_CLS", "target_modules": ["query", "value", "dense"], "layers_to_transform": 0,
      "layers_pattern": "layer"},
     sorted(f"{B}.0.{m}" for m in ("attention.self.query", "attention.self.value", "attention.output.dense",
                                   "intermediate.dense", "output.dense"))),
    ("bert-layers-list", "bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "layers_to_transform": [1]},
     [f"{B}.1.attention.self.query", f"{B}.1.attention.self.value"]),
    ("bert-modules-to-save-not-targeted", "bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "classifier"]},
     [f"{B}.{i}.attention.self.query" for i in (0, 1)]),
    ("t5-default", "t5", {},
     sorted([f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in (0, 1) for m in "qv"]
            + [f"decoder.block.{i}.layer.0.SelfAttention.{m}" for i in (0, 1) for m in "qv"]
            + [f"decoder.block.{i}.layer.1.EncDecAttention.{m}" for i in (0, 1) for m in "qv"])),
    # without layers_pattern the *first* numbered segment is the layer index (block, not sub-layer)
    ("t5-layers-no-pattern", "t5", {"target_modules": ["q"], "layers_to_transform": [1]},
     ["decoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.q",
      "encoder.block.1.layer.0.SelfAttention.q"]),
    ("t5-layers-pattern-layer", "t5", {"target_modules": ["q"], "layers_to_transform": [1], "layers_pattern": "layer"},
     ["decoder.block.0.layer.1.EncDecAttention.q", "decoder.block.1.layer.1.EncDecAttention.q"]),
    ("t5-all-linear", "t5", {"target_modules": "all-linear"}, 32),
]


@pytest.mark.parametrize("family,kwargs,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_selection_matches_peft(family, kwargs, expected):
    if expected is None:  # both libraries must refuse
        with pytest.raises(TargetError):
            kit_selected(family, **kwargs)
        with pytest.raises(ValueError):
            ref_selected(family, **kwargs)
        return
    ours = kit_selected(family, **kwargs)
    theirs = ref_selected(family, **kwargs)
    assert ours == theirs
    if isinstance(expected, int):
        assert len(ours) == expected
    else:
        assert ours == expected


def test_all_linear_excludes_heads():
    llama = kit_selected("llama", target_modules="all-linear")
    assert "lm_head" not in llama and all(n.startswith(L) for n in llama)
    bert = kit_selected("bert", task_type="SEQ_CLS", target_modules="all-linear")
    assert "classifier" not in bert and "bert.pooler.dense" in bert
    # without a task type the classifier is an ordinary Linear (peft does the same)
    plain = kit_selected("bert", target_modules="all-linear")
    assert plain == ref_selected("bert", target_modules="all-linear")
    assert set(plain) - set(bert) == {"classifier"}


def test_no_match_lists_candidates():
    with pytest.raises(TargetError) as info:
        kit_selected("llama", target_modules=["qproj", "nothing_here"])
    msg = str(info.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    assert "nothing_here" in msg
    assert isinstance(info.value, ValueError)


def test_layer_filter_that_removes_everything_raises():
    with pytest.raises(TargetError):
        kit_selected("llama", target_modules=["q_proj"], layers_to_transform=[7])
    with pytest.raises(ValueError):
        ref_selected("llama", target_modules=["q_proj"], layers_to_transform=[7])


def test_excluding_every_target_raises():
    with pytest.raises(TargetError):
        kit_selected("llama", target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_container_target_raises_naming_it():
    with pytest.raises(TargetError) as info:
        kit_selected("llama", target_modules=["self_attn"])
    assert "model.layers.0.self_attn" in str(info.value)
    with pytest.raises(ValueError):
        ref_selected("llama", target_modules=["self_attn"])


def test_default_targets_unknown_architecture_raises():
    model = FAMILY["convnet"].model()
    with pytest.raises(TargetError) as info:
        peftkit.get_peft_model(model, peftkit.LoraConfig())
    assert "target_modules" in str(info.value)


def test_model_family():
    assert model_family(FAMILY["llama"].model()) == "llama"
    assert model_family(FAMILY["gpt2"].model()) == "gpt2"
    assert model_family(FAMILY["bert"].model()) == "bert"
    assert model_family(FAMILY["roberta"].model()) == "bert"
    assert model_family(FAMILY["t5"].model()) == "t5"
    assert model_family(FAMILY["convnet"].model()) is None


# -- rank_pattern / alpha_pattern --------------------------------------------------------------------

def kit_rank_scaling(family: str, **kwargs) -> dict[str, tuple[int, float]]:
    pm = peftkit.get_peft_model(FAMILY[family].model(), peftkit.LoraConfig(**kwargs))
    return {p: (layer.adapters["default"].r, layer.adapters["default"].scaling) for p, layer in pm.base_model.adapter_layers()}


def ref_rank_scaling(family: str, **kwargs) -> dict[str, tuple[int, float]]:
    pm = peft.get_peft_model(FAMILY[family].model(), peft.LoraConfig(**kwargs))
    return {n: (m.r["default"], m.scaling["default"]) for n, m in pm.base_model.model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


PATTERN_CASES = [
    ("llama-mixed", "llama", dict(
        r=8, lora_alpha=16, target_modules="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 4},
        alpha_pattern={"v_proj": 3, f"{L}.0.self_attn.o_proj": 32}),
     {f"{L}.0.self_attn.q_proj": (2, 8.0), f"{L}.1.mlp.up_proj": (4, 4.0), f"{L}.0.mlp.up_proj": (8, 2.0),
      f"{L}.0.self_attn.v_proj": (8, 3 / 8), f"{L}.0.self_attn.o_proj": (8, 4.0), f"{L}.1.self_attn.o_proj": (8, 2.0)}),
    ("llama-rslora-first-match", "llama", dict(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"proj": 5, "k_proj": 2, r".*_proj": 3}, alpha_pattern={f"{L}.1.self_attn.v_proj": 7}),
     {f"{L}.0.self_attn.k_proj": (2, 16 / 2 ** 0.5), f"{L}.0.self_attn.q_proj": (3, 16 / 3 ** 0.5),
      f"{L}.1.self_attn.v_proj": (3, 7 / 3 ** 0.5)}),
    ("gpt2", "gpt2", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
        rank_pattern={"attn.c_proj": 2}, alpha_pattern={"h.1.mlp.c_proj": 1}),
     {"transformer.h.0.attn.c_proj": (2, 4.0), "transformer.h.1.mlp.c_proj": (4, 0.25),
      "transformer.h.0.mlp.c_proj": (4, 2.0), "transformer.h.1.attn.c_attn": (4, 2.0)}),
    ("bert", "bert", dict(
        task_type="SEQ_CLS", r=6, lora_alpha=12, target_modules=["query", "value", "dense"],
        rank_pattern={r"layer\.0\..*": 3}, alpha_pattern={"output.dense": 1.5}),
     {f"{B}.0.attention.self.query": (3, 4.0), f"{B}.1.attention.self.query": (6, 2.0),
      f"{B}.0.attention.output.dense": (3, 0.5), f"{B}.1.output.dense": (6, 0.25), "bert.pooler.dense": (6, 2.0)}),
]


@pytest.mark.parametrize("family,kwargs,spot", [c[1:] for c in PATTERN_CASES], ids=[c[0] for c in PATTERN_CASES])
def test_rank_and_alpha_patterns_match_peft(family, kwargs, spot):
    ours = kit_rank_scaling(family, **kwargs)
    theirs = ref_rank_scaling(family, **kwargs)
    assert sorted(ours) == sorted(theirs)
    for path in theirs:
        assert ours[path][0] == theirs[path][0], path
        assert ours[path][1] == pytest.approx(theirs[path][1], rel=1e-12), path
    for path, (r, s) in spot.items():
        assert ours[path][0] == r, path
        assert ours[path][1] == pytest.approx(s, rel=1e-12), path


def test_pattern_value_direct():
    key = "model.layers.0.self_attn.q_proj"
    assert pattern_value(None, key, 8) == 8
    assert pattern_value({}, key, 8) == 8
    assert pattern_value({"q_proj": 2}, key, 8) == 2
    assert pattern_value({"q_proj": 2}, "model.layers.0.self_attn.k_proj", 8) == 8
    # must match whole dotted segments at the end of the key
    assert pattern_value({"proj": 3}, key, 8) == 8
    assert pattern_value({"proj": 3}, "a.proj", 8) == 3
    assert pattern_value({"proj": 3}, "proj", 8) == 3
    assert pattern_value({"q_proj": 2}, "model.q_proj.inner", 8) == 8
    assert pattern_value({"self_attn": 2}, key, 8) == 8
    # full path and dotted suffix
    assert pattern_value({key: 4}, key, 8) == 4
    assert pattern_value({"self_attn.q_proj": 4}, key, 8) == 4
    # regex
    assert pattern_value({r"layers\.1\..*": 4}, "model.layers.1.mlp.up_proj", 8) == 4
    assert pattern_value({r"layers\.1\..*": 4}, "model.layers.10.mlp.up_proj", 8) == 8
    assert pattern_value({r"(q|v)_proj": 5}, "model.layers.3.self_attn.v_proj", 8) == 5
    # first matching pattern wins, in dict order
    assert pattern_value({"q_proj": 2, r".*": 5}, key, 8) == 2
    assert pattern_value({r".*": 5, "q_proj": 2}, key, 8) == 5
    assert pattern_value({"q_proj": 2, r".*": 5}, "x.v_proj", 8) == 5
    # the default passes through unchanged (any type)
    assert pattern_value({"q_proj": 2}, "x.k_proj", 1.5) == 1.5


@pytest.mark.parametrize("patterns", [
    {"q_proj": 2},
    {"proj": 3, "k_proj": 2},
    {r"layers\.1\..*": 4, "q_proj": 2},
    {r".*": 7, "q_proj": 2},
    {"self_attn.q_proj": 9, r"model\.layers\.0\..*": 1},
    {r"(up|down)_proj": 6},
])
def test_pattern_value_agrees_with_peft_get_pattern_key(patterns):
    keys = [f"{L}.{i}.{m}" for i in (0, 1, 10) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head", "proj", "a.proj"]
    for key in keys:
        expected = patterns.get(get_pattern_key(patterns.keys(), key), -1)
        assert pattern_value(patterns, key, -1) == expected, key


def test_filters_that_do_nothing_warn():
    import warnings as _w

    family = FAMILY["llama"]
    with pytest.warns(UserWarning, match="exclude_modules"):
        peftkit.get_peft_model(family.model(), peftkit.LoraConfig(exclude_modules=["nothing_here"]))
    with pytest.warns(UserWarning, match="rank_pattern keys \\['o_proj'\\]"):
        peftkit.get_peft_model(family.model(), peftkit.LoraConfig(rank_pattern={"o_proj": 4, "q_proj": 2}))
    with _w.catch_warnings():
        _w.simplefilter("error")
        peftkit.get_peft_model(family.model(), peftkit.LoraConfig(rank_pattern={"v_proj": 2}, exclude_modules=["q_proj"],
                                                                   target_modules=["q_proj", "v_proj"]))
