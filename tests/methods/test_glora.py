"""GLoRA: config fields and validation, the pure weight math, merges with a bias, Conv1D, multi-adapter
merges; the file / count / output parity with peft is in tests/test_peft_parity.py."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.glora import GloraAdapter, GloraConfig
from peftkit.methods.glora import functional as GF

from ..parity import perturb


def test_config_fields_and_defaults_match_peft(tmp_path):
    ours = {f.name for f in dataclasses.fields(GloraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.GloraConfig)}
    assert ours == theirs
    a, b = GloraConfig(), peft.GloraConfig()
    for name in theirs - {"peft_type", "peft_version"}:
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "GLORA"
    # a config saved by peft loads in peftkit (and back)
    peft.GloraConfig(r=3, config_A_B="vector", config_D_E="none", target_modules=["q"]).save_pretrained(tmp_path)
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GloraConfig) and (loaded.r, loaded.config_A_B, loaded.config_D_E) == (3, "vector", "none")
    loaded.save_pretrained(tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).config_A_B == "vector"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "GLORA"


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [({"r": 0}, "r", "> 0"), ({"r": 1.5}, "r", "integer"),
     ({"config_A_B": "dense"}, "config_A_B", "'lora', 'vector', 'constant', 'none'"),
     ({"config_C": "constant"}, "config_C", "'lora', 'vector', 'none'"),
     ({"config_D_E": "lora"}, "config_D_E", "'vector', 'constant', 'none'"),
     ({"bias": "lora_only"}, "bias", "glora_only"), ({"init_weights": "yes"}, "init_weights", "True or False")],
)
def test_config_validation_names_the_field_and_allowed_values(kwargs, field, expected):
    with pytest.raises(ConfigError, match=rf"GloraConfig\.{field}: .*{expected}"):
        GloraConfig(**kwargs)


def test_functional_merge_inverts():
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    a, b, c = torch.randn(5, 1, generator=g) * 0.1, torch.randn(5, 3, generator=g), torch.randn(3, 1, generator=g)
    d, e = torch.tensor(0.2), torch.randn(5, generator=g)
    w = GF.merge_weight(w0, a, b)
    torch.testing.assert_close(w, w0 + w0 * a + b)
    torch.testing.assert_close(GF.unmerge_weight(w, a, b), w0)
    delta = GF.bias_delta(w0, b0, c, d, e)
    torch.testing.assert_close(delta, b0 * d + e + (w0 @ c).squeeze(-1))
    torch.testing.assert_close(GF.unmerge_bias(GF.merge_bias(b0, delta), d, e, (w0 @ c).squeeze(-1)), b0)
    assert GF.weight_delta(w0, None, None) is None and GF.bias_delta(w0, b0, None, None, None) is None


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 8)
        self.v = nn.Linear(6, 8, bias=False)

    def forward(self, x):
        return self.q(x) + self.v(x).tanh()


@pytest.mark.parametrize("paths", [("lora", "lora", "vector"), ("vector", "vector", "constant"),
                                   ("constant", "none", "vector"), ("none", "lora", "constant")])
def test_layer_matches_peft_and_merges_exactly(paths):
    kw = dict(r=2, target_modules=["q", "v"], config_A_B=paths[0], config_C=paths[1], config_D_E=paths[2],
              init_weights=False)
    torch.manual_seed(0)
    base = Net()
    with torch.no_grad():
        base.q.bias.normal_()
    theirs = peft.get_peft_model(_copy(base), peft.GloraConfig(**kw))
    ours = peftkit.get_peft_model(_copy(base), GloraConfig(**kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if ".adapters." not in k}
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_conv1d_equals_the_linear_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    conv = Conv1D(4, 6)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias.normal_())
    cfg = GloraConfig(r=2, config_D_E="vector", init_weights=False)
    a, b = GloraAdapter(lin, cfg), GloraAdapter(conv, cfg, init=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(b(conv, x, conv(x)), a(lin, x, lin(x)))
    torch.testing.assert_close(b.merge(conv, conv.weight)[0], a.merge(lin, lin.weight)[0].t())
    assert GloraAdapter.param_count(conv, cfg) == sum(p.numel() for p in b.parameters())


def test_off_paths_are_zero_file_keys_without_parameters():
    cfg = GloraConfig(r=2, config_A_B="none", config_C="none", config_D_E="none", target_modules=["q"])
    model = peftkit.get_peft_model(Net(), cfg)
    state = peftkit.get_peft_model_state_dict(model)
    assert {k.rsplit("q.", 1)[1]: tuple(v.shape) for k, v in state.items()} == {
        "glora_A.zeros": (8, 6), "glora_B.zeros": (8, 6), "glora_C.zeros": (6, 1), "glora_D.zeros": (8,),
        "glora_E.zeros": (8,)}
    assert model.get_nb_trainable_parameters()[0] == 0
