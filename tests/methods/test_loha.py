"""LoHa: the Hadamard-product math, config validation, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lycoris import LoHaAdapter, LoHaConfig
from peftkit.methods.lycoris import functional as YF

from ..families import FAMILY
from ..parity import paired_configs


def configs(name: str, **kwargs):
    return paired_configs(FAMILY[name], peft.LoHaConfig, LoHaConfig, **kwargs)


# -- config ---------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours = {f.name: f for f in dataclasses.fields(LoHaConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoHaConfig)}
    assert set(ours) == set(theirs)
    a, b = LoHaConfig(), peft.LoHaConfig()
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                 "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "modules_to_save"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "LOHA" and str(b.peft_type.value) == "LOHA"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"alpha": 0}, "alpha"), ({"alpha": -1}, "alpha"),
     ({"rank_dropout": 1.0}, "rank_dropout"), ({"rank_dropout": -0.1}, "rank_dropout"),
     ({"module_dropout": 1.5}, "module_dropout"), ({"init_weights": "gaussian"}, "init_weights"),
     ({"rank_pattern": {"q": 0}}, "rank_pattern"), ({"alpha_pattern": {"q": 0}}, "alpha_pattern"),
     ({"layers_pattern": "layers"}, "layers_pattern")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"LoHaConfig\.{field}"):
        LoHaConfig(**kwargs)


def test_config_json_round_trip_and_peft_reads_it(tmp_path):
    cfg = LoHaConfig(r=6, alpha=3, rank_dropout=0.1, target_modules=["q_proj"], use_effective_conv2d=True)
    cfg.save_pretrained(tmp_path)
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, LoHaConfig) and back.to_dict() == cfg.to_dict()
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.LoHaConfig)
    assert (ref.r, ref.alpha, ref.rank_dropout, ref.use_effective_conv2d) == (6, 3, 0.1, True)


# -- pure functions -------------------------------------------------------------------------------------
def test_hadamard_delta_is_the_elementwise_product():
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(7, 3), (3, 5), (7, 3), (3, 5)])
    d = YF.hadamard_delta(w1a, w1b, w2a, w2b, 0.5)
    expected = torch.tensor([[0.5 * (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) for j in range(5)] for i in range(7)],
                            dtype=torch.float64)
    torch.testing.assert_close(d, expected, atol=1e-12, rtol=1e-12)
    # the point of LoHa: rank up to r^2 from 2 r (d_in + d_out) parameters
    big = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(20, 3), (3, 20), (20, 3), (3, 20)]]
    assert torch.linalg.matrix_rank(YF.hadamard_delta(*big, 1.0)) == 9


def test_cp_rebuild_and_cp_delta_match_peft():
    from peft.tuners.loha.layer import make_weight_cp

    g = torch.Generator().manual_seed(1)
    t1, t2 = torch.randn(3, 3, 2, 2, generator=g), torch.randn(3, 3, 2, 2, generator=g)
    w1a, w2a = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    w1b, w2b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    k = YF.cp_rebuild(t1, w1a, w1b)
    assert k.shape == (5, 4, 2, 2)
    # entry by entry: sum_ij t[i, j, k, l] w_a[i, p] w_b[j, q]
    torch.testing.assert_close(k[2, 1, 0, 1], (t1[:, :, 0, 1] * torch.outer(w1a[:, 2], w1b[:, 1])).sum())
    ours = YF.hadamard_delta_cp(t1, w1a, w1b, t2, w2a, w2b, 0.25)
    torch.testing.assert_close(ours, make_weight_cp(t1, w1a, w1b, t2, w2a, w2b, torch.tensor(0.25)))


@pytest.mark.parametrize(
    ("d_out", "d_in", "kernel", "effective", "count"),
    [(32, 16, (), False, 2 * 4 * 48), (8, 3, (3, 3), False, 2 * 4 * (8 + 27)),
     (8, 3, (3, 3), True, 2 * (4 * 4 * 9 + 4 * 8 + 4 * 3)), (8, 3, (1, 1), True, 2 * 4 * (8 + 3))],
)
def test_shapes_closed_form(d_out, d_in, kernel, effective, count):
    shapes = YF.loha_shapes(d_out, d_in, kernel, 4, effective)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == count
    assert ("hada_t1" in shapes) == (effective and kernel != (1, 1))


# -- adapter ----------------------------------------------------------------------------------------------
def test_starts_at_zero_with_one_zero_factor_and_random_with_init_false():
    base = nn.Linear(6, 5)
    a = LoHaAdapter(base, LoHaConfig(r=2, alpha=2))
    assert torch.count_nonzero(a.hada_w2_b) == 0 and torch.count_nonzero(a.hada_w1_a) > 0
    assert torch.count_nonzero(a.delta_weight(base)) == 0
    b = LoHaAdapter(base, LoHaConfig(r=2, alpha=2, init_weights=False))
    assert torch.count_nonzero(b.delta_weight(base)) == 30


def test_conv1d_gpt2_delta_is_transposed_and_forward_matches_merge():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(7, 5)  # weight (d_in=5, d_out=7)
    a = LoHaAdapter(base, LoHaConfig(r=2, alpha=3, init_weights=False))
    assert a.hada_w1_a.shape == (7, 2) and a.hada_w1_b.shape == (2, 5)
    d = a.delta_weight(base)
    assert d.shape == base.weight.shape
    x = torch.randn(3, 5)
    out = a(base, x, base(x))
    torch.testing.assert_close(out, x @ (base.weight + d) + base.bias, atol=1e-6, rtol=1e-6)


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=False)
    a = LoHaAdapter(base, LoHaConfig(r=2, alpha=2, init_weights=False, rank_dropout=0.5, module_dropout=0.5))
    x = torch.eye(8)
    full = a.delta_weight(base).t()
    a.eval()
    for _ in range(5):
        torch.testing.assert_close(a(base, x, torch.zeros(8, 6)), full)
    a.train()
    skipped, rows_kept = 0, []
    for _ in range(200):
        got = a(base, x, torch.zeros(8, 6))
        if torch.count_nonzero(got) == 0:
            skipped += 1
            continue
        kept = got.abs().sum(0) > 0
        c = kept.float().mean()
        # kept output rows are the full delta's, rescaled by 1 / (fraction kept), as in PEFT's LoHa
        torch.testing.assert_close(got[:, kept], full[:, kept] / c, atol=1e-6, rtol=1e-5)
        rows_kept.append(c.item())
    assert 60 < skipped < 140  # module_dropout 0.5: about half the calls skip the adapter
    assert 0.35 < sum(rows_kept) / len(rows_kept) < 0.65


# -- compatibility with Hugging Face PEFT ------------------------------------------------------------------
def test_peft_cannot_wrap_gpt2_conv1d_but_peftkit_can():
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(FAMILY["gpt2"].model(), peft.LoHaConfig(r=4))
    model = peftkit.get_peft_model(FAMILY["gpt2"].model(), LoHaConfig(r=4))
    assert [p for p, _ in model.base_model.adapter_layers()] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_default_init_identical_to_peft_under_the_same_seed():
    family = FAMILY["llama"]
    ref_cfg, our_cfg = configs("llama", r=4, alpha=4)
    ref = peft.get_peft_model(family.model(), ref_cfg)
    ours = peftkit.get_peft_model(family.model(), our_cfg)
    ref_state, our_state = peft.get_peft_model_state_dict(ref), peftkit.get_peft_model_state_dict(ours)
    assert ref_state.keys() == our_state.keys() and len(ref_state) == 16
    for key in ref_state:
        assert torch.equal(ref_state[key], our_state[key]), key


def test_hadamard_delta_gradients_and_saved_tensors():
    """The hand-written backward equals autograd's (gradcheck), and only the four rank-r factors are kept
    for backward, not the two (d_out, d_in) products."""
    from peftkit.methods.lycoris import functional as YF

    g = torch.Generator().manual_seed(4)
    factors = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((6, 2), (2, 5), (6, 2), (2, 5))]
    assert torch.autograd.gradcheck(lambda a, b, c, d: YF.hadamard_delta(a, b, c, d, 0.7), factors)
    torch.testing.assert_close(YF.hadamard_delta(*factors, 0.7),
                               (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7, atol=0, rtol=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        YF.hadamard_delta(*factors, 0.7)
    assert sorted(saved) == sorted([(6, 2), (2, 5), (6, 2), (2, 5)])
