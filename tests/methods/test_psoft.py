"""PSOFT: config compatibility with Hugging Face PEFT, the principal-subspace factors, and bad input."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.psoft import PsoftAdapter, PsoftConfig
from peftkit.methods.psoft.functional import cayley, principal_factors, skew

from ..families import FAMILY, untouched


def test_config_fields_and_defaults_match_peft(tmp_path):
    ours = {f.name: f.default for f in dataclasses.fields(PsoftConfig) if f.default is not dataclasses.MISSING}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PsoftConfig) if f.default is not dataclasses.MISSING}
    assert ours == theirs
    peft.PsoftConfig(r=5, psoft_orth=False, ab_svd_init="pissa_init").save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, PsoftConfig) and (loaded.r, loaded.psoft_orth, loaded.ab_svd_init) == (5, False, "pissa_init")
    PsoftConfig(r=2, use_cayley_neumann=True, cayley_neumann_eps=0.5).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.PsoftConfig) and back.use_cayley_neumann and back.cayley_neumann_eps == 0.5


@pytest.mark.parametrize("bad", [{"r": 0}, {"ab_svd_init": "lora"}, {"psoft_svd": "qr"}, {"psoft_dropout": -0.1},
                                 {"use_cayley_neumann": True, "cayley_neumann_eps": 1.5},
                                 {"use_cayley_neumann": True, "num_cayley_neumann_terms": 0}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        PsoftConfig(**bad)


def test_unused_options_warn_as_in_peft():
    with pytest.warns(UserWarning, match="num_cayley_neumann_terms"):
        PsoftConfig(num_cayley_neumann_terms=3)
    with pytest.warns(UserWarning, match="psoft_svd_lowrank_niter"):
        PsoftConfig(psoft_svd_lowrank_niter=3)


@pytest.mark.parametrize("init", ["psoft_init", "pissa_init"])
def test_factors_span_the_principal_part(init):
    torch.manual_seed(0)
    w = torch.randn(9, 7)
    a, b = principal_factors(w, 7, 2.0, init, "full", 10, 0)
    torch.testing.assert_close(2.0 * b @ a, w, atol=1e-5, rtol=1e-5)  # full rank: the whole weight
    if init == "psoft_init":
        torch.testing.assert_close(a @ a.t(), torch.eye(7), atol=1e-5, rtol=1e-5)


def test_cayley_is_orthogonal():
    r = 5
    rows, cols = torch.triu_indices(r, r, 1)
    q = skew(torch.randn(r * (r - 1) // 2), r, rows, cols)
    rot = cayley(q)
    torch.testing.assert_close(rot @ rot.t(), torch.eye(r), atol=1e-5, rtol=1e-5)


def test_rank_above_layer_is_refused_model_untouched():
    model = FAMILY["llama"].model()  # v_proj: 32 -> 16
    with untouched(model), pytest.raises(ValueError, match=r"v_proj: PsoftConfig.r=20 .*1 <= r <= min\(in_features, out_features\) = 16"):
        peftkit.get_peft_model(model, PsoftConfig(r=20))


def test_frozen_factors_are_not_trained_or_saved():
    ad = PsoftAdapter(nn.Linear(8, 6), PsoftConfig(r=3, psoft_mag_a=False))
    assert {n for n, _ in ad.named_parameters()} == {"psoft_R", "vector_b"}
    assert set(ad.checkpoint_keys.values()) == {"psoft_R.weight", "psoft_R.vector_b"}
    assert "psoft_A" not in ad.state_dict() and ad.psoft_A.shape == (3, 8) and ad.psoft_B.shape == (6, 3)
