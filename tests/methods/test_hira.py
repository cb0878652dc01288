"""HiRA: config files both ways, the layer types beyond the parity table (Embedding, Conv2d) against peft,
grouped convolutions refused before the model changes, the initialisations."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit import ConfigError

from ..families import FAMILY, nudge_trainable


def test_config_files_both_ways(tmp_path):
    ours = peftkit.HiraConfig(r=6, init_weights="gaussian", hira_dropout=0.1, rank_pattern={"q_proj": 2})
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.HiraConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.r, theirs.init_weights, theirs.hira_dropout, theirs.rank_pattern) == (6, "gaussian", 0.1,
                                                                                         {"q_proj": 2})
    peft.HiraConfig(r=4, init_weights=False, target_modules=["q_proj"]).save_pretrained(tmp_path / "peft")
    back = peftkit.PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(back) is peftkit.HiraConfig and back.r == 4 and back.init_weights is False
    defaults = peftkit.HiraConfig()
    assert (defaults.r, defaults.init_weights, defaults.hira_dropout, defaults.rank_pattern) == (32, True, 0.0, {})


@pytest.mark.parametrize(("family", "targets"), [("llama", ["embed_tokens", "q_proj"]), ("convnet", ["conv1", "conv2"])])
def test_embedding_and_conv_like_peft(family, targets):
    fam = FAMILY[family]
    kwargs = {"r": 3, "target_modules": targets}
    ours = peftkit.get_peft_model(fam.model(), peftkit.HiraConfig(**kwargs))
    theirs = peft.get_peft_model(fam.model(), peft.HiraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.manual_seed(0)
    nudge_trainable(ours, 0.3)
    state = peftkit.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, state)
    expected = fam.run(theirs)
    torch.testing.assert_close(fam.run(ours), expected, atol=1e-5, rtol=0)
    before = {n: p.clone() for n, p in ours.named_parameters() if ".adapters." not in n}
    ours.merge_adapter()
    torch.testing.assert_close(fam.run(ours), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    assert all(torch.equal(before[n], p) for n, p in ours.named_parameters() if ".adapters." not in n)


def test_grouped_conv_fails_before_the_model_changes():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"^0: .*groups=2.*expected groups=1"):
        peftkit.get_peft_model(model, peftkit.HiraConfig(r=2, target_modules=["0", "1"]))
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.Conv2d)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", [True, "gaussian", False])
def test_initialisations(mode):
    model = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.HiraConfig(r=4, init_weights=mode,
                                                                                target_modules=["q_proj"]))
    a = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert bool(a.hira_B.abs().sum() == 0) == (mode is not False)
    if mode == "gaussian":
        assert 0.15 < a.hira_A.std().item() < 0.35  # std 1 / r
