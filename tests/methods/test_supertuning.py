"""Super-Tuning: config fields and validation, the sparse math, refusals before the model changes; the
file / count / output parity with peft is in tests/test_peft_parity.py."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer
from peftkit.methods.supertuning import SupertuningConfig
from peftkit.methods.supertuning import functional as SF


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_precomputed_indices=False warns in both libraries
        yield


def test_config_fields_and_defaults_match_peft(tmp_path):
    ours = {f.name for f in dataclasses.fields(SupertuningConfig)}
    assert ours == {f.name for f in dataclasses.fields(peft.SupertuningConfig)}
    a, b = SupertuningConfig(), peft.SupertuningConfig()
    for name in ours - {"peft_type", "peft_version"}:
        assert getattr(a, name) == getattr(b, name), name
    assert SupertuningConfig(r=3).lora_alpha == 6 == peft.SupertuningConfig(r=3).lora_alpha
    peft.SupertuningConfig(r=2, sparsity=0.5, select_top=False).save_pretrained(tmp_path)
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SupertuningConfig) and (loaded.r, loaded.lora_alpha, loaded.select_top) == (2, 4, False)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [({"sparsity": 1.0}, "sparsity", r"\[0, 1\)"), ({"sparsity": -0.1}, "sparsity", r"\[0, 1\)"),
     ({"r": 0}, "r", "> 0"), ({"r": 2.0}, "r", "integer"), ({"lora_alpha": 4}, "lora_alpha", "r is None"),
     ({"r": 2, "lora_dropout": 1.0}, "lora_dropout", r"\[0, 1\)"), ({"select_top": 1}, "select_top", "True or False")],
)
def test_config_validation_names_the_field(kwargs, field, expected):
    with pytest.raises(ConfigError, match=rf"SupertuningConfig\.{field}: .*{expected}"):
        SupertuningConfig(**kwargs)


def test_sparse_matvec_equals_the_dense_delta():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=g)
    idx = SF.select_support(w0, 9, largest=True)
    assert idx.dtype == torch.int32 and torch.equal(w0.abs().flatten()[idx.long()].sort().values,
                                                    w0.abs().flatten().sort().values[-9:])
    values, x = torch.randn(9, generator=g), torch.randn(2, 3, 7, generator=g)
    dense = SF.sparse_delta(values, idx, (5, 7))
    torch.testing.assert_close(SF.sparse_matvec(x, values, idx, 7, 5), x @ dense.t())
    assert SF.num_trainable(1024, 0.99) == 10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(16, 16)

    def forward(self, x):
        return self.q(x[..., :4]).sum(-1, keepdim=True) + self.v(x)


def test_sparsity_leaving_nothing_fails_naming_the_module_and_model_untouched():
    model = Net()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConfigError, match=r"SupertuningConfig\.sparsity: 0\.95 .* 4 x 4 weight of q; expected a sparsity in \[0, 0\.9375\]"):
        peftkit.get_peft_model(model, SupertuningConfig(target_modules=["q", "v"], sparsity=0.95))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_indices_saved_for_all_adapters_or_none():
    model = peftkit.get_peft_model(Net(), SupertuningConfig(target_modules=["v"], sparsity=0.5))
    with pytest.raises(ConfigError, match="save_precomputed_indices"):
        model.add_adapter("other", SupertuningConfig(target_modules=["v"], sparsity=0.5, save_precomputed_indices=False))


@pytest.mark.parametrize("save", [True, False])
def test_round_trip_with_and_without_saved_indices(tmp_path, save):
    torch.manual_seed(0)
    base = Net()
    cfg = SupertuningConfig(target_modules=["q", "v"], sparsity=0.5, r=2, init_weights=False,
                            save_precomputed_indices=save)
    model = peftkit.get_peft_model(base, cfg)
    x = torch.randn(3, 16)
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = peftkit.PeftModel.from_pretrained(Net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    ref = peft.PeftModel.from_pretrained(Net_seeded(), tmp_path)
    torch.testing.assert_close(ref(x), expected, atol=1e-5, rtol=0)


def Net_seeded():  # noqa: N802 - the same base as the test's
    torch.manual_seed(0)
    return Net()
