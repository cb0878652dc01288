"""FRoD: config compatibility with Hugging Face PEFT, the basis / rotation math, shared state and bad input."""

from __future__ import annotations


import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.frod import FrodAdapter, FrodConfig
from peftkit.methods.frod import functional as FF
from peftkit.targeting import NotApplicableError, TargetError

from ..families import FAMILY
from ..parity import field_defaults


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(FrodConfig) == field_defaults(peft.FrodConfig)
    peft.FrodConfig(sparse_rate=0.2, regularization_alpha=0.5, projection_prng_key=9,
                    target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, FrodConfig)
    assert (loaded.sparse_rate, loaded.regularization_alpha, loaded.projection_prng_key) == (0.2, 0.5, 9)
    FrodConfig(frod_dropout=0.1, bias="frod_only", save_projection=False).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.FrodConfig) and back.frod_dropout == 0.1 and back.bias == "frod_only"
    assert back.save_projection is False


@pytest.mark.parametrize("bad", [{"sparse_rate": 1.5}, {"sparse_rate": -0.1}, {"frod_dropout": 1.0},
                                 {"bias": "lora_only"}, {"regularization_alpha": -1.0}, {"save_projection": "yes"},
                                 {"projection_prng_key": 1.5}, {"layers_pattern": "layers"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match="FrodConfig"):
        FrodConfig(**bad)


def test_categories_and_block_order_as_peft():
    from peft.tuners.frod.model import _category_from_key, _layer_index_from_key

    for key in ["model.layers.3.self_attn.q_proj", "encoder.layer.0.attention.output.dense",
                "encoder.layer.0.output.dense", "h.1.attn.c_attn", "layers.2.fc", "classifier", "a.b"]:
        assert FF.category_from_key(key) == _category_from_key(key), key
        assert FF.layer_index_from_key(key, 7) == _layer_index_from_key(key, 7), key
    assert FF.category_from_key("encoder.layer.0.attention.output.dense") == "attention_output"


def test_basis_and_frame_reconstruct_the_weight():
    torch.manual_seed(0)
    ws = [torch.randn(6, 5), torch.randn(6, 5)]  # taller than wide: the QR / eigen branch
    v = FF.projection_from_weights(ws, 1e-3)
    assert v.shape == (5, 5) and torch.linalg.matrix_rank(v) == 5
    wide = FF.projection_from_weights([torch.randn(2, 5)], 1e-3)  # wider than tall: right singular vectors
    torch.testing.assert_close(wide.T @ wide, torch.eye(5), atol=1e-5, rtol=0)
    u, lam = FF.u_and_lambda(v, ws[1])
    torch.testing.assert_close(u.norm(dim=0), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(u @ torch.diag(lam) @ v.T, ws[1], atol=1e-5, rtol=1e-5)
    idx = torch.tensor([[0, 3], [2, 1]])
    vals = torch.tensor([0.5, -2.0])
    dense = torch.diag(lam).clone()
    dense[0, 2] += 0.5
    dense[3, 1] -= 2.0
    torch.testing.assert_close(FF.core(idx, vals, lam), dense)
    torch.testing.assert_close(FF.adapted_weight(u, dense, v), u @ dense @ v.T)


def test_sparse_pattern_counts_and_draw():
    g = torch.Generator().manual_seed(0)
    idx = FF.sparse_pattern(10, 0.05, g)
    assert idx.shape == (2, 5) and bool((idx[0] != idx[1]).all())
    assert len({tuple(c) for c in idx.t().tolist()}) == 5
    assert FF.nnz_of(10, 0.0) == 0 and FF.nnz_of(10, 0.001) == 1 and FF.nnz_of(10, 1.0) == 90
    assert FF.sparse_pattern(1, 0.5, g).shape == (2, 0)


@pytest.mark.parametrize("tokens", [2, 64])
def test_forward_is_the_rotated_weight(tokens):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    ad = FrodAdapter(base, FrodConfig(sparse_rate=0.1, init_weights=False), "layers.0.q")
    v = getattr(ad.shared, "frod_V/q")
    idx = getattr(ad.shared, "frod_s_indices/q")
    assert idx.shape == (2, 14) and ad.frod_lambda_s_values.shape == (14,) and ad.frod_lambda_l.shape == (12,)
    s = torch.zeros(12, 12)
    s[idx[0], idx[1]] = ad.frod_lambda_s_values.detach()
    w_new = ad.frod_U @ (s + torch.diag(ad.frod_lambda_l.detach())) @ v.T
    x = torch.randn(tokens, 12)
    with torch.no_grad():
        torch.testing.assert_close(ad.fused_forward(base, x), x @ w_new.T + base.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ad(base, x, base(x)), x @ w_new.T + base.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ad.delta_weight(base), w_new - base.weight, atol=1e-5, rtol=1e-5)
    assert FrodAdapter.param_count(base, FrodConfig(sparse_rate=0.1)) == 12 + 14


def test_starts_at_base_and_shares_one_basis_per_category():
    fam = FAMILY["llama"]
    model = peftkit.get_peft_model(fam.model(), FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.02))
    torch.testing.assert_close(fam.run(model), fam.base_output(), atol=1e-4, rtol=1e-4)
    shared = model.base_model.shared_state["default"].tensors()
    assert sorted(shared) == [f"{k}/self_attn_{p}" for k in ("frod_V", "frod_s_indices", "frod_s_size")
                              for p in ("q_proj", "v_proj")]
    layers = dict(model.base_model.adapters("default"))
    d_in = layers["model.layers.0.self_attn.q_proj"].d_in
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == len(layers) * (d_in + int(d_in * d_in * 0.02))
    sd = peftkit.get_peft_model_state_dict(model)
    assert "base_model.frod_V.self_attn_q_proj" in sd and not any("frod_U" in k for k in sd)


def test_adapters_must_share_the_seed():
    fam = FAMILY["llama"]
    model = peftkit.get_peft_model(fam.model(), FrodConfig(projection_prng_key=1))
    with pytest.raises(ConfigError, match="projection_prng_key"):
        model.add_adapter("other", FrodConfig(projection_prng_key=2))
    assert list(model.peft_config) == ["default"]


def test_unsupported_layer_fails_and_leaves_model_untouched():
    fam = FAMILY["llama"]
    plain = fam.model()
    before = {n: type(m) for n, m in plain.named_modules()}
    with pytest.raises((TypeError, TargetError), match="embed_tokens"):
        peftkit.get_peft_model(plain, FrodConfig(target_modules=["embed_tokens"]))
    assert {n: type(m) for n, m in plain.named_modules()} == before


def test_mixed_input_sizes_in_one_category_are_not_applicable():
    fam = FAMILY["unet"]
    plain = fam.model()
    before = {n: type(m) for n, m in plain.named_modules()}
    with pytest.raises(NotApplicableError, match="target_modules.*attn1_to_q"):
        peftkit.get_peft_model(plain, FrodConfig())
    assert {n: type(m) for n, m in plain.named_modules()} == before


@pytest.mark.parametrize("d", [6, 1100])  # 1100: several row blocks of M (1100^2 floats > 4 MiB)
def test_core_linear_equals_composing_the_core_and_keeps_no_dense_core(d):
    from peftkit.methods.frod import functional as FF

    g = torch.Generator().manual_seed(0)
    nnz = max(1, d * d // 100)
    indices = torch.stack([torch.randint(0, d, (nnz,), generator=g), torch.randint(0, d, (nnz,), generator=g)])
    args = [torch.randn(3, 4, d, generator=g, dtype=torch.float64), indices,
            torch.randn(nnz, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)]
    if d < 10:
        z, _, v, lam = (a.requires_grad_() if a.is_floating_point() else a for a in args)
        assert torch.autograd.gradcheck(lambda z, v, lam: FF.CoreLinear.apply(z, indices, v, lam), (z, v, lam))
        return
    ours = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    ref = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = FF.CoreLinear.apply(*ours)
    assert (d, d) not in saved  # the dense core is rebuilt in backward, not kept
    expected = torch.nn.functional.linear(ref[0], FF.core(ref[1], ref[2], ref[3]))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    for a, b in ((ours[0], ref[0]), (ours[2], ref[2]), (ours[3], ref[3])):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=0)
