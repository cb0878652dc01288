"""LoKr: the Kronecker-product math, config validation, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft.tuners.lokr.layer import make_kron, make_weight_cp
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lycoris import LoKrAdapter, LoKrConfig
from peftkit.methods.lycoris import functional as YF

from ..families import FAMILY
from ..parity import paired_configs


def configs(name: str, **kwargs):
    return paired_configs(FAMILY[name], peft.LoKrConfig, LoKrConfig, **kwargs)


# -- config ---------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(LoKrConfig)}
    assert ours == {f.name for f in dataclasses.fields(peft.LoKrConfig)}
    a, b = LoKrConfig(), peft.LoKrConfig()
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
                 "decompose_factor", "rank_dropout_scale", "init_weights", "rank_pattern", "alpha_pattern",
                 "target_modules", "exclude_modules", "modules_to_save"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "LOKR" and str(b.peft_type.value) == "LOKR"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"r": 0}, "r"), ({"r": -3}, "r"), ({"alpha": 0.0}, "alpha"), ({"rank_dropout": 1}, "rank_dropout"),
     ({"module_dropout": -0.5}, "module_dropout"), ({"module_dropout": 1.0}, "module_dropout"),
     ({"decompose_factor": 0}, "decompose_factor"), ({"init_weights": "gaussian"}, "init_weights"),
     ({"rank_pattern": {"q": -1}}, "rank_pattern")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"LoKrConfig\.{field}"):
        LoKrConfig(**kwargs)


# -- pure functions -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dim", "factor", "expected"), [(256, -1, (16, 16)), (128, -1, (8, 16)),
                                                          (127, -1, (1, 127)), (128, 4, (4, 32)), (37, -1, (1, 37)),
                                                          (96, -1, (8, 12)), (32, 3, (2, 16))])
def test_factorization_examples(dim, factor, expected):
    assert YF.factorization(dim, factor) == expected
    m, n = YF.factorization(dim, factor)
    assert m * n == dim and m <= n


def test_factorization_agrees_with_peft_everywhere_small():
    for dim in range(1, 300):
        for factor in (-1, 2, 3, 4, 8, 16):
            assert YF.factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_kron_delta_shape_and_value_against_torch_kron():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(3, 2, generator=g), torch.randn(4, 5, generator=g)
    d = YF.kron_delta(w1, w2, 0.5)
    assert d.shape == (12, 10)
    torch.testing.assert_close(d, 0.5 * torch.kron(w1, w2))
    # block (i, j) is w1[i, j] * w2
    torch.testing.assert_close(d[4:8, 5:10], 0.5 * w1[1, 1] * w2)
    # conv: W1 broadcast over the kernel, (a b, c d, k, k)
    k2 = torch.randn(4, 5, 3, 3, generator=g)
    dc = YF.kron_delta(w1, k2, 2.0)
    assert dc.shape == (12, 10, 3, 3)
    torch.testing.assert_close(dc[8:12, 0:5], 2.0 * w1[2, 0] * k2)
    torch.testing.assert_close(dc, make_kron(w1, k2, 2.0))


def test_kron_matvec_equals_multiplying_by_the_kronecker_product():
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    y = YF.kron_matvec(x, w1, w2)
    assert y.shape == (2, 7, 15)
    torch.testing.assert_close(y, x @ torch.kron(w1, w2).t(), atol=1e-12, rtol=1e-12)


def test_kron_matvec_gradients_and_saved_tensors():
    """The hand-written backward equals autograd's through the formed Kronecker product (gradcheck), and
    only the input and the two factors are kept for backward (no per-token intermediate)."""
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(YF.kron_matvec, (x, w1, w2))
    assert torch.autograd.gradcheck(lambda a, b: YF.kron_matvec(x.detach(), a, b), (w1, w2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        YF.kron_matvec(x, w1, w2).sum()
    assert sorted(saved) == sorted([x.numel(), w1.numel(), w2.numel()])


def test_cp_rebuild_matches_peft():
    g = torch.Generator().manual_seed(2)
    t, wa, wb = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)
    torch.testing.assert_close(YF.cp_rebuild(t, wa, wb), make_weight_cp(t, wa, wb))


@pytest.mark.parametrize(
    ("args", "expected"),
    [((32, 32, (), 4), {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}),
     ((32, 32, (), 2), {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
     ((37, 32, (), 1, True), {"lokr_w1_a": (1, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (37, 1), "lokr_w2_b": (1, 8)}),
     ((64, 64, (), 1, True), {"lokr_w1_a": (8, 1), "lokr_w1_b": (1, 8), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}),
     ((8, 3, (3, 3), 4), {"lokr_w1": (2, 1), "lokr_w2": (4, 3, 3, 3)}),
     ((64, 64, (3, 3), 1, False, -1, True), {"lokr_w1": (8, 8), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 8),
                                              "lokr_w2_b": (1, 8)}),
     ((64, 64, (3, 3), 1), {"lokr_w1": (8, 8), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 72)})],
)
def test_shapes_follow_peft_rules(args, expected):
    assert YF.lokr_shapes(*args) == expected


# -- adapter ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("init", "zero"), [(True, "lokr_w1"), ("lycoris", "lokr_w2")])
def test_init_zeroes_one_factor_and_false_is_random(init, zero):
    base = nn.Linear(16, 12)
    a = LoKrAdapter(base, LoKrConfig(r=8, alpha=2, init_weights=init))
    assert torch.count_nonzero(getattr(a, zero)) == 0
    other = "lokr_w2" if zero == "lokr_w1" else "lokr_w1"
    assert torch.count_nonzero(getattr(a, other)) > 0
    assert torch.count_nonzero(a.delta_weight(base)) == 0
    b = LoKrAdapter(base, LoKrConfig(r=8, alpha=2, init_weights=False))
    assert torch.count_nonzero(b.delta_weight(base)) == 12 * 16


def test_conv1d_gpt2_delta_is_transposed_and_forward_matches_merge():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 6)  # weight (d_in=6, d_out=12)
    a = LoKrAdapter(base, LoKrConfig(r=4, alpha=3, init_weights=False))
    assert a.lokr_w1.shape == (3, 2) and a.lokr_w2.shape == (4, 3)
    d = a.delta_weight(base)
    assert d.shape == base.weight.shape
    torch.testing.assert_close(d, 0.75 * torch.kron(a.lokr_w1, a.lokr_w2).t())
    x = torch.randn(3, 6)
    torch.testing.assert_close(a(base, x, base(x)), x @ (base.weight + d) + base.bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rescale", [False, True])
def test_dropouts_only_in_training(rescale):
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=False)
    cfg = LoKrConfig(r=8, alpha=2, init_weights=False, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=rescale)
    a = LoKrAdapter(base, cfg)
    x = torch.eye(8)
    full = a.delta_weight(base).t()
    a.eval()
    torch.testing.assert_close(a(base, x, torch.zeros(8, 6)), full)
    a.train()
    skipped, fractions = 0, []
    for _ in range(200):
        got = a(base, x, torch.zeros(8, 6))
        if torch.count_nonzero(got) == 0:
            skipped += 1
            continue
        kept = got.abs().sum(0) > 0
        c = kept.float().mean() if rescale else torch.tensor(1.0)  # PEFT's LoKr rescales only when asked
        torch.testing.assert_close(got[:, kept], full[:, kept] / c, atol=1e-6, rtol=1e-5)
        fractions.append(kept.float().mean().item())
    assert 60 < skipped < 140
    assert 0.35 < sum(fractions) / len(fractions) < 0.65


# -- compatibility with Hugging Face PEFT ------------------------------------------------------------------
def test_peft_cannot_wrap_gpt2_conv1d_but_peftkit_can():
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(FAMILY["gpt2"].model(), peft.LoKrConfig(r=4))
    model = peftkit.get_peft_model(FAMILY["gpt2"].model(), LoKrConfig(r=4))
    assert [p for p, _ in model.base_model.adapter_layers()] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


@pytest.mark.parametrize("kwargs", [{"r": 4, "alpha": 4}, {"r": 1, "decompose_both": True, "init_weights": "lycoris"}])
def test_default_init_identical_to_peft_under_the_same_seed(kwargs):
    family = FAMILY["llama"]
    ref_cfg, our_cfg = configs("llama", **kwargs)
    ref = peft.get_peft_model(family.model(), ref_cfg)
    ours = peftkit.get_peft_model(family.model(), our_cfg)
    ref_state, our_state = peft.get_peft_model_state_dict(ref), peftkit.get_peft_model_state_dict(ours)
    assert ref_state.keys() == our_state.keys() and len(ref_state) >= 8
    for key in ref_state:
        assert torch.equal(ref_state[key], our_state[key]), key
