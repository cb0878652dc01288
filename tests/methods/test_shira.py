"""SHiRA: the same random masks as peft, config files both ways, custom masks, bad ranks and masks refused
before the model changes."""

from __future__ import annotations

import peft
import pytest
import torch

import peftkit
from peftkit import ConfigError

from ..families import FAMILY


@pytest.mark.parametrize("seed", [None, 7])
def test_same_masks_as_peft(seed):
    kwargs = {"r": 2, "random_seed": seed, "target_modules": ["q_proj", "v_proj"]}
    ours = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.ShiraConfig(**kwargs))
    theirs = peft.get_peft_model(FAMILY["llama"].model(), peft.ShiraConfig(**kwargs))
    a, b = peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and any(k.endswith(".shira_indices") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_config_files_both_ways(tmp_path):
    peftkit.ShiraConfig(r=4, random_seed=11, init_weights=False).save_pretrained(tmp_path / "ours")
    theirs = peft.ShiraConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.r, theirs.random_seed, theirs.init_weights, theirs.mask_type) == (4, 11, False, "random")
    peft.ShiraConfig(r=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "peft")
    back = peftkit.PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(back) is peftkit.ShiraConfig and back.r == 8 and back.mask_fn is peftkit.methods.shira.random_mask
    defaults = peftkit.ShiraConfig()
    assert (defaults.r, defaults.mask_type, defaults.random_seed, defaults.init_weights) == (32, "random", None, True)


def test_custom_mask_function():
    def first_entries(base_layer, r, **kwargs):
        d_out, d_in = base_layer.weight.shape
        mask = torch.zeros(d_out * d_in)
        mask[: r * (d_in + d_out)] = 1
        return mask.view(d_out, d_in)

    config = peftkit.ShiraConfig(r=1, mask_type="first", target_modules=["q_proj"])
    config.mask_fn = first_entries
    model = peftkit.get_peft_model(FAMILY["llama"].model(), config)
    idx = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].shira_indices
    assert idx[0].tolist() == [0] * 32 + [1] * 32 and idx[1].tolist() == list(range(32)) * 2


def _refused(config, match):
    model = FAMILY["llama"].model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        peftkit.get_peft_model(model, config)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_fail_before_the_model_changes():
    # v_proj is 16 x 32: at most 512 // 48 = 10 ranks' worth of entries
    _refused(peftkit.ShiraConfig(r=11, target_modules=["q_proj", "v_proj"]),
             r"self_attn\.v_proj: ShiraConfig\.r=11 .*expected 1 <= r <= 10")
    _refused(peftkit.ShiraConfig(r=2, mask_type="mine", target_modules=["q_proj"]), "ShiraConfig.mask_type")
    config = peftkit.ShiraConfig(r=2, mask_type="mine", target_modules=["q_proj"])
    config.mask_fn = lambda base, r, **kw: torch.ones_like(base.weight)
    _refused(config, r"q_proj: ShiraConfig\.mask_fn returned 1024 ones; expected exactly")
