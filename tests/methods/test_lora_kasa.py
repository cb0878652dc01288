"""KaSA (``LoraConfig(kasa_config=KasaConfig(...))``) against peft 0.21.2 on tiny Llama: config fields, the truncated
base weight, the trainable state, files both ways, merge / unmerge, the regularisation loss, refused inputs."""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora import kasa
from tests.families import FAMILY, untouched
from tests.parity import assert_loads_both_ways, assert_merges_like_peft, assert_same_trainable_state, perturb

LLAMA = FAMILY["llama"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _cfg(lib, **kw):
    kw.setdefault("kasa_config", lib.KasaConfig(beta=0.01, gamma=0.02))
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def _pair(**kw):
    """peft's KaSA model, perturbed (B starts at zero), and ours with its weights (from peft's state dict)."""
    theirs = peft.get_peft_model(LLAMA.model(), _cfg(peft, **kw))
    perturb(theirs)
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit, **kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def test_config_fields_and_defaults_match_peft():
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.KasaConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.KasaConfig)}
    assert ours == theirs == {"beta": 1e-4, "gamma": 1e-3}
    cfg = peftkit.LoraConfig(kasa_config={"beta": 0.5})  # a dict read back from adapter_config.json
    assert cfg.kasa_config == peftkit.KasaConfig(beta=0.5)
    assert cfg.to_dict()["kasa_config"] == {"beta": 0.5, "gamma": 1e-3}
    assert peftkit.LoraConfig(kasa_config=peft.KasaConfig(gamma=0.0)).kasa_config == peftkit.KasaConfig(gamma=0.0)


def test_same_init_trainable_state_and_truncated_base():
    torch.manual_seed(5)
    theirs = peft.get_peft_model(LLAMA.model(), _cfg(peft))
    torch.manual_seed(5)
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit))
    assert_same_trainable_state(theirs, ours)
    ours_state, their_state = peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_diag"
    assert key in their_state and their_state[key].shape == (4,)
    for k in their_state:  # B starts at zero, the diagonal at randn (peft draws more random numbers before it)
        assert ("lora_B" in k) == bool((ours_state[k] == 0).all()) == bool((their_state[k] == 0).all()), k
    # the base weight lost its 4 smallest singular components, as peft's
    w = ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    ref = theirs.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(w, ref, atol=1e-6, rtol=0)
    orig = LLAMA.model().model.layers[0].self_attn.q_proj.weight
    U, S, Vh = torch.linalg.svd(orig)
    torch.testing.assert_close(w, (U[:, :28] * S[:28]) @ Vh[:28], atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(w).item() == 28
    # the count is the closed form r (d_in + d_out + 1): q 32 -> 32, v 32 -> 16, down 37 -> 32, two layers
    layer = ours.get_base_model().model.layers[0].mlp.down_proj
    assert ours.get_nb_trainable_parameters()[0] == 2 * 4 * ((32 + 32 + 1) + (32 + 16 + 1) + (37 + 32 + 1))
    assert kasa.KasaAdapter.param_count(layer.base_layer, _cfg(peftkit), "down_proj") == 4 * (37 + 32 + 1)


def test_outputs_and_grads_match_peft():
    theirs, ours = _pair(lora_dropout=0.0)
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    theirs.train(), ours.train()
    LLAMA.run(theirs).square().mean().backward()
    LLAMA.run(ours).square().mean().backward()
    ref = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            key = name.replace(".adapters.default", "").replace(".lora_A", ".lora_A.weight").replace(
                ".lora_B", ".lora_B.weight")
            torch.testing.assert_close(p.grad, ref[key], atol=1e-5, rtol=1e-4, msg=name)


def test_files_load_both_ways(tmp_path):
    ref_cfg, our_cfg = _cfg(peft), _cfg(peftkit)

    def train(model, family):
        perturb(model)

    assert_loads_both_ways(LLAMA, ref_cfg, our_cfg, tmp_path, train=train)
    peft_file = peft.PeftConfig.from_pretrained(tmp_path / "peftkit")
    assert peft_file.kasa_config == peft.KasaConfig(beta=0.01, gamma=0.02)


def test_merge_unmerge_like_peft():
    theirs, ours = _pair()
    changed = assert_merges_like_peft(LLAMA, theirs, ours)
    assert len(changed) == 6 and all("q_proj" in k or "v_proj" in k or "down_proj" in k for k in changed)
    # the merged weight is exactly peft's W' + s B diag A
    theirs, ours = _pair()
    theirs.merge_adapter(), ours.merge_adapter()
    ref = theirs.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight
    assert torch.equal(ours.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight, ref)


def test_regularization_loss_matches_peft():
    theirs, ours = _pair()
    expected = theirs.base_model._get_kasa_loss()
    got = kasa.kasa_loss(ours)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"]
    A, B, d = layer.lora_A, layer.lora_B, layer.lora_diag
    direct = 0.01 * (d ** 2).sum() + 0.02 * ((B.T @ B - torch.eye(4)).norm() + (A @ A.T - torch.eye(4)).norm())
    torch.testing.assert_close(kasa.regularization(A, B, d, 0.01, 0.02), direct)
    assert kasa.kasa_loss(ours, "other") == 0.0


@pytest.mark.parametrize("kwargs,field", [
    ({"kasa_config": peftkit.KasaConfig()}, None),
    ({"kasa_config": {"beta": -1.0}}, "beta"),
    ({"kasa_config": {"gamma": "x"}}, "gamma"),
    ({"kasa_config": 3}, "kasa_config"),
    ({"kasa_config": {}, "use_dora": True}, "kasa_config"),
    ({"kasa_config": {}, "alora_invocation_tokens": [1, 2]}, "kasa_config"),
    ({"kasa_config": {}, "target_parameters": ["experts.down_proj"]}, "kasa_config"),
    ({"kasa_config": {}, "fan_in_fan_out": True}, "kasa_config"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
    if field is None:
        assert peftkit.LoraConfig(**kwargs).kasa_config == peftkit.KasaConfig()
        return
    with pytest.raises(ConfigError, match=field):
        peftkit.LoraConfig(**kwargs)


@pytest.mark.parametrize("family,targets,rank,match", [
    ("gpt2", ["c_attn"], 4, "nn.Linear layers only"),  # Conv1D
    ("llama", ["q_proj", "embed_tokens"], 4, "embed_tokens"),
    ("llama", ["q_proj", "down_proj"], 32, "r < min"),
])
def test_unsupported_layer_leaves_model_untouched(family, targets, rank, match):
    model = FAMILY[family].model()
    with untouched(model), pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=rank, target_modules=targets,
                                                         kasa_config=peftkit.KasaConfig()))


def test_kasa_and_plain_lora_are_not_mixed():
    model = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit))
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        model.add_adapter("plain", peftkit.LoraConfig(r=4, target_modules=TARGETS))
    plain = peftkit.get_peft_model(LLAMA.model(), peftkit.LoraConfig(r=4, target_modules=TARGETS))
    w = copy.deepcopy(plain.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        plain.add_adapter("kasa", _cfg(peftkit))
    assert torch.equal(plain.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, w)
