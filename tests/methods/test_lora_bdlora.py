"""BD-LoRA (``LoraConfig(use_bdlora=BdLoraConfig(...))``) against peft 0.21.2 on tiny Llama: config fields and the
adapter_config.json round trip, the block-diagonal file layout, outputs and gradients, files both ways, merge /
unmerge, the math against dense block-diagonal factors, refused inputs."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora import bdlora
from tests.families import FAMILY, untouched
from tests.parity import (
    assert_loads_both_ways, assert_merges_like_peft, assert_same_file_layout, assert_same_trainable_state,
    field_defaults, perturb,
)

LLAMA = FAMILY["llama"]
# q / v: block-diagonal B (column-sharded), o: block-diagonal A (row-sharded), down_proj (d_in 37): plain LoRA
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _cfg(lib, nblocks=2, match_strict=False, **kw):
    bd = lib.BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=nblocks,
                          match_strict=match_strict)
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=kw.pop("target_modules", TARGETS), use_bdlora=bd, **kw)


def _pair(**kw):
    """peft's BD-LoRA model, perturbed (B starts at zero), and ours with its weights (from peft's state dict)."""
    theirs = peft.get_peft_model(LLAMA.model(), _cfg(peft, **kw))
    perturb(theirs)
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit, **kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def _adapter(model, path="model.layers.0.self_attn.q_proj"):
    return model.get_base_model().get_submodule(path).adapters["default"]


def test_config_fields_defaults_and_json_round_trip(tmp_path):
    ours, theirs = field_defaults(peftkit.BdLoraConfig), field_defaults(peft.BdLoraConfig)
    assert ours == theirs == {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1,
                              "match_strict": True}
    cfg = peftkit.LoraConfig(use_bdlora={"nblocks": 4, "target_modules_bd_a": ["down_proj"]})  # read back from JSON
    assert cfg.use_bdlora == peftkit.BdLoraConfig(target_modules_bd_a=["down_proj"], nblocks=4)
    assert cfg.to_dict()["use_bdlora"] == {"target_modules_bd_a": ["down_proj"], "target_modules_bd_b": None,
                                           "nblocks": 4, "match_strict": True}
    assert peftkit.LoraConfig(use_bdlora=peft.BdLoraConfig(nblocks=3)).use_bdlora == peftkit.BdLoraConfig(nblocks=3)
    _cfg(peftkit).save_pretrained(tmp_path / "ours")
    _cfg(peft).save_pretrained(tmp_path / "theirs")
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text())["use_bdlora"] for d in ("ours", "theirs")]
    assert saved[0] == saved[1] == {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj", "v_proj"],
                                    "nblocks": 2, "match_strict": False}
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").use_bdlora == _cfg(peft).use_bdlora
    assert peftkit.LoraConfig.from_pretrained(tmp_path / "theirs").use_bdlora == _cfg(peftkit).use_bdlora


def test_file_layout_init_and_trainable_count():
    theirs = peft.get_peft_model(LLAMA.model(), _cfg(peft))
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit))
    assert_same_trainable_state(theirs, ours)
    state = peftkit.get_peft_model_state_dict(ours)
    shapes = {k.rsplit("layers.0.", 1)[1]: tuple(v.shape) for k, v in state.items() if ".layers.0." in k}
    assert shapes == {"self_attn.q_proj.lora_A.weight": (4, 32), "self_attn.q_proj.lora_B.weight": (32, 2),
                      "self_attn.v_proj.lora_A.weight": (4, 32), "self_attn.v_proj.lora_B.weight": (16, 2),
                      "self_attn.o_proj.lora_A.weight": (4, 16), "self_attn.o_proj.lora_B.weight": (32, 4),
                      "mlp.down_proj.lora_A.weight": (4, 37), "mlp.down_proj.lora_B.weight": (32, 4)}
    # closed form per layer: B block-diagonal r d_in + d_out r / N, A block-diagonal r d_in / N + d_out r
    per_layer = (4 * 32 + 32 * 2) + (4 * 32 + 16 * 2) + (4 * 16 + 32 * 4) + 4 * (37 + 32)
    assert ours.get_nb_trainable_parameters()[0] == 2 * per_layer
    o_proj = ours.get_base_model().model.layers[0].self_attn.o_proj.base_layer
    assert bdlora.BdLoraAdapter.param_count(o_proj, _cfg(peftkit), "model.layers.0.self_attn.o_proj") == 4 * 16 + 128
    # the block-diagonal B starts at zero and A at Kaiming-uniform (a = 0: bound sqrt(6 / fan_in)), as peft
    assert not _adapter(ours).lora_B.any() and not _adapter(ours, "model.layers.0.self_attn.o_proj").lora_B.any()
    a = _adapter(ours, "model.layers.0.self_attn.o_proj").lora_A
    assert a.abs().max() <= (6 / 16) ** 0.5 and a.abs().max() > (1 / 16) ** 0.5
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(LLAMA.model()), atol=0, rtol=0)  # identity at init


def test_outputs_and_grads_match_peft():
    theirs, ours = _pair(lora_dropout=0.0)
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    theirs.train(), ours.train()
    LLAMA.run(theirs).square().mean().backward()
    LLAMA.run(ours).square().mean().backward()
    ref = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    got = {}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            got[name.replace(".adapters.default", "").replace(".lora_A", ".lora_A.weight").replace(
                ".lora_B", ".lora_B.weight")] = p.grad
    assert got.keys() == ref.keys() and len(got) == 16
    for key, grad in got.items():
        torch.testing.assert_close(grad, ref[key], atol=1e-5, rtol=1e-4, msg=key)


def test_math_is_lora_with_dense_block_diagonal_factors():
    _, ours = _pair()
    torch.manual_seed(0)
    for path, dense_a, nb in (("model.layers.1.self_attn.o_proj", True, 2), ("model.layers.1.self_attn.v_proj",
                                                                             False, 2)):
        layer = ours.get_base_model().get_submodule(path)
        ad, base = layer.adapters["default"], layer.base_layer
        A, B = ad.lora_A.detach(), ad.lora_B.detach()
        A_full = torch.block_diag(*A.chunk(nb)) if dense_a else A
        B_full = B if dense_a else torch.block_diag(*B.chunk(nb))
        assert A_full.shape == (4, base.in_features) and B_full.shape == (base.out_features, 4)
        off = A_full[:2, 16:] if dense_a else B_full[:base.out_features // 2, 2:]
        assert not off.any()  # a zero block off the diagonal
        x = torch.randn(3, 5, base.in_features)
        with torch.no_grad():
            expected = base(x) + 2.0 * x @ A_full.T @ B_full.T
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ad.delta_weight(base), 2.0 * B_full @ A_full, atol=0, rtol=0)


def test_files_load_both_ways(tmp_path):
    def train(model, family):
        perturb(model)

    assert_loads_both_ways(LLAMA, _cfg(peft), _cfg(peftkit), tmp_path, train=train)
    assert_same_file_layout(tmp_path, "o_proj.lora_A.weight")
    assert peft.PeftConfig.from_pretrained(tmp_path / "peftkit").use_bdlora == _cfg(peft).use_bdlora


def test_merge_unmerge_like_peft():
    theirs, ours = _pair()
    changed = assert_merges_like_peft(LLAMA, theirs, ours)
    assert len(changed) == 8 and all(any(t in k for t in TARGETS) for k in changed)
    theirs, ours = _pair()
    theirs.merge_adapter(), ours.merge_adapter()
    for path in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):  # B- and A-block-diagonal
        ref = theirs.get_base_model().get_submodule(path).base_layer.weight
        assert torch.equal(ours.get_base_model().get_submodule(path).base_layer.weight, ref), path


def test_block_linear_is_the_dense_product():
    torch.manual_seed(1)
    w, x = torch.randn(12, 5), torch.randn(2, 3, 15)
    torch.testing.assert_close(bdlora.block_linear(x, w, 3), x @ bdlora.dense(w, 3).T, atol=1e-6, rtol=1e-6)
    assert bdlora.dense(w, 3).shape == (12, 15) and not bdlora.dense(w, 3)[:4, 5:].any()


@pytest.mark.parametrize("kwargs,field", [
    ({"nblocks": 0}, "nblocks"),
    ({"nblocks": 2.0}, "nblocks"),
    ({"match_strict": "yes"}, "match_strict"),
    ({"target_modules_bd_a": "q_proj"}, "target_modules_bd_a"),
    ({"target_modules_bd_b": [1]}, "target_modules_bd_b"),
    ({"target_modules_bd_a": ["q_proj", "o_proj"], "target_modules_bd_b": ["q_proj"]}, "target_modules_bd_b"),
])
def test_bad_bdlora_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"BdLoraConfig.*{field}"):
        peftkit.BdLoraConfig(**kwargs)
    with pytest.raises(ConfigError, match=field):  # the same values read back from a file
        peftkit.LoraConfig(use_bdlora=kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"use_dora": True}, "use_bdlora"),
    ({"use_qalora": True}, "use_qalora"),
    ({"init_lora_weights": "pissa"}, "use_bdlora"),
    ({"lora_bias": True}, "use_bdlora"),
    ({"target_parameters": ["experts.down_proj"]}, "use_bdlora"),
    ({"use_bdlora": 3}, "use_bdlora"),
])
def test_bad_lora_config_raises_naming_the_field(kwargs, field):
    kwargs.setdefault("use_bdlora", peftkit.BdLoraConfig(target_modules_bd_a=["o_proj"]))
    with pytest.raises(ConfigError, match=field):
        peftkit.LoraConfig(**kwargs)


@pytest.mark.parametrize("family,targets,bd,match", [
    # down_proj's in_features 37 is not a multiple of 2
    ("llama", ["o_proj", "down_proj"], {"target_modules_bd_a": ["o_proj", "down_proj"], "nblocks": 2},
     r"use_bdlora\.nblocks: a block-diagonal lora_A on model\.layers\.0\.mlp\.down_proj needs in_features and r "
     r"divisible by nblocks=2; in_features=37"),
    ("llama", ["q_proj"], {"target_modules_bd_b": ["q_proj"], "nblocks": 3},  # r 4 and d_out 32
     r"use_bdlora\.nblocks: .*q_proj needs r and out_features divisible by nblocks=3; r=4, out_features=32"),
    ("llama", ["q_proj", "o_proj"], {"target_modules_bd_a": ["o_proj"]},
     r"use_bdlora\.match_strict: model\.layers\.0\.self_attn\.q_proj matches neither"),
    ("llama", ["q_proj", "embed_tokens"], {"target_modules_bd_b": ["q_proj"], "match_strict": False},
     r"use_bdlora: .*embed_tokens is a Embedding"),
    ("gpt2", ["c_attn"], {"target_modules_bd_b": ["c_attn"]}, r"use_bdlora: .*c_attn is a Conv1D"),
])
def test_unsupported_target_fails_at_get_peft_model_and_leaves_model_untouched(family, targets, bd, match):
    model = FAMILY[family].model()
    with untouched(model), pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=targets, use_bdlora=bd))
