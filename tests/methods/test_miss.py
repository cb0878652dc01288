"""MiSS: config files both ways, bad shapes refused before the model changes, every variant merges exactly,
GPT-2's Conv1D as the equivalent Linear."""

from __future__ import annotations

import peft
import pytest
import torch

import peftkit
from peftkit import ConfigError

from ..families import FAMILY, nudge_trainable
from ..parity import linearized


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_config_files_both_ways(tmp_path):
    ours = peftkit.MissConfig(r=6, mini_r=3, init_weights="mini", target_modules=["q_proj"], miss_dropout=0.1)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.MissConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.r, theirs.mini_r, theirs.init_weights, theirs.miss_dropout) == (6, 3, "mini", 0.1)
    peft.MissConfig(init_weights="bat", r=4, bias="MiSS_only").save_pretrained(tmp_path / "peft")
    back = peftkit.PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(back) is peftkit.MissConfig and back.init_weights == "bat" and back.bias == "MiSS_only"
    defaults = peftkit.MissConfig()
    assert (defaults.r, defaults.mini_r, defaults.init_weights, defaults.miss_dropout) == (64, 1, True, 0.0)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 64}, "MissConfig.r=64"),  # above the input width 32
    ({"r": 3, "init_weights": "bat"}, "MissConfig.r=3"),  # (r, r) blocks do not tile 32 x 16
    ({"r": 2, "mini_r": 5, "init_weights": "mini"}, "MissConfig.mini_r=5"),
])
def test_bad_shapes_fail_before_the_model_changes(kwargs, field):
    model = FAMILY["llama"].model()
    before = _state(model)
    with pytest.raises(ConfigError, match=field) as err:
        peftkit.get_peft_model(model, peftkit.MissConfig(target_modules=["q_proj", "v_proj"], **kwargs))
    message = str(err.value)
    assert "self_attn" in message and ("allowed" in message or "expected" in message)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs", [{"r": 4, "init_weights": "bat"}, {"r": 3, "mini_r": 4, "init_weights": "mini"},
                                    {"r": 3}])
def test_variants_merge_and_unmerge_exactly(kwargs):
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), peftkit.MissConfig(target_modules=["q_proj", "v_proj"], **kwargs))
    torch.manual_seed(0)
    nudge_trainable(model, 0.3)
    before = {n: p.clone() for n, p in model.named_parameters() if ".adapters." not in n}
    unmerged = family.run(model)
    model.merge_adapter()
    torch.testing.assert_close(family.run(model), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if ".adapters." not in n)


@pytest.mark.parametrize("mode", [True, "bat", "mini"])
def test_gpt2_conv1d_is_the_equivalent_linear(mode):
    """peft wraps nn.Linear only: GPT-2's Conv1D here gives what peft gives on the same layers as Linear."""
    family = FAMILY["gpt2"]
    kwargs = {"r": 4, "mini_r": 8, "init_weights": mode, "target_modules": ["c_attn", "c_proj"]}
    ours = peftkit.get_peft_model(family.model(), peftkit.MissConfig(**kwargs))
    theirs = peft.get_peft_model(linearized(family.model()), peft.MissConfig(**kwargs))
    torch.manual_seed(0)
    nudge_trainable(ours, 0.2)
    peft.set_peft_model_state_dict(theirs, peftkit.get_peft_model_state_dict(ours))
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
