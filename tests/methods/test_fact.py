"""FacT (arXiv 2212.03145): dW = s U Sigma V^T per d x d slice, TT and TK, on values; start, grads, files, merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peftkit import FacTConfig, PeftModel, get_peft_model, tiny_models
from peftkit.config import ConfigError
from peftkit.methods.fact import functional as FF
from peftkit.targeting import TargetError

from ..families import ConvNet, nudge_trainable

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def vit(**kw):
    torch.manual_seed(0)
    return tiny_models.vit(**kw).eval()


def adapted(model, i, kind):
    block = model.base_model.model.vit.layers[i]
    return (block.mlp if kind.startswith("fc") else block.attention).get_submodule(kind)


@pytest.mark.parametrize("fact_type", ["tt", "tk"])
def test_delta_is_the_papers_formula_slice_by_slice(fact_type):
    """ViT with d = 8, FFN 16 (two slices): every weight's update, slice (i, j), is s U Sigma_ij V^T, where
    Sigma_ij is the weight's own TT core or, for TK, C x3 P_row (sum_k C[:, :, k] P[row, k])."""
    model = get_peft_model(vit(hidden_size=8, intermediate_size=16, num_attention_heads=2),
                           FacTConfig(fact_type=fact_type, r=2, scale=0.5, dropout=0.0))
    nudge_trainable(model, 0.3)
    shared = model.base_model.shared_state["default"]
    u, v = shared.fact_U, shared.fact_V
    assert u.shape == v.shape == (8, 2) and model.peft_config["default"].hidden_size == 8
    for i in range(2):
        for kind in KINDS:
            layer = adapted(model, i, kind)
            a_ = layer.adapters["default"]
            d_out, d_in = layer.base_layer.weight.shape
            expected = torch.zeros(d_out, d_in)
            for bi in range(d_out // 8):
                for bj in range(d_in // 8):
                    if fact_type == "tt":
                        core = a_.fact_S[2 * bi:2 * bi + 2, 2 * bj:2 * bj + 2]
                    else:
                        row = a_.fact_P[bi * (d_in // 8) + bj]
                        core = sum(shared.fact_C[:, :, k] * row[k] for k in range(2))
                    expected[8 * bi:8 * bi + 8, 8 * bj:8 * bj + 8] = 0.5 * u @ core @ v.T
            torch.testing.assert_close(a_.delta_weight(layer.base_layer), expected, atol=1e-6, rtol=1e-5)
            # the forward path (no dW formed) gives the same update
            x = torch.randn(3, d_in)
            torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-5, rtol=1e-5)


def test_widths_not_a_multiple_of_d_take_cropped_slices():
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    s = torch.randn(2 * 2, 3 * 2, generator=g)  # a = 2, b = 3 slices for a (7, 9) weight
    full = FF.fact_delta(u, v, s, 8, 12, 1.5)  # the same cores on the padded (8, 12) weight
    delta = FF.fact_delta(u, v, s, 7, 9, 1.5)
    assert torch.equal(delta, full[:7, :9])
    x = torch.randn(5, 9, generator=g)
    torch.testing.assert_close(FF.fact_apply(x, u, v, s, 7, 1.5), x @ delta.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fact_type, per_slice, once", [("tt", 9, 0), ("tk", 3, 27)])
def test_parameter_count_and_only_factors_get_gradients(fact_type, per_slice, once):
    # tiny ViT: d = 32, FFN 37 -> q, k, v, o one slice each, fc1 2 x 1, fc2 1 x 2: 8 slices per block, 2 blocks
    model = get_peft_model(vit(), FacTConfig(fact_type=fact_type, r=3, dropout=0.0))
    assert model.get_nb_trainable_parameters()[0] == 2 * 32 * 3 + once + 16 * per_slice
    nudge_trainable(model, 0.1)
    model.train()
    model(pixel_values=PIXELS).logits.pow(2).mean().backward()
    trained = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == ({"fact_U", "fact_V", "fact_S"} if fact_type == "tt" else {"fact_U", "fact_V", "fact_C", "fact_P"})
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, n


@pytest.mark.parametrize("fact_type", ["tt", "tk"])
def test_starts_at_base_with_official_init(fact_type):
    base_out = vit()(pixel_values=PIXELS).logits
    model = get_peft_model(vit(), FacTConfig(fact_type=fact_type, r=4))
    torch.testing.assert_close(model(pixel_values=PIXELS).logits, base_out, atol=0, rtol=0)
    shared = model.base_model.shared_state["default"]
    assert not shared.fact_U.any()  # U = 0: the update starts at zero
    assert 0 < shared.fact_V.abs().max() <= 32 ** -0.5  # nn.Linear(d, r)'s bound 1 / sqrt(d)
    q = adapted(model, 0, "q_proj").adapters["default"]
    core = q.fact_S if fact_type == "tt" else q.fact_P
    assert core.abs().sum() > 0


@pytest.mark.parametrize("fact_type", ["tt", "tk"])
def test_merge_unmerge_bit_exact_and_save_load(fact_type, tmp_path):
    model = get_peft_model(vit(), FacTConfig(fact_type=fact_type, r=3))
    nudge_trainable(model, 0.1)
    model.eval()
    before = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." in n}
    with torch.no_grad():
        expected = model(pixel_values=PIXELS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(pixel_values=PIXELS).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    own = "fact_S" if fact_type == "tt" else "fact_P"
    layers = {f"base_model.model.vit.layers.{i}.{'mlp' if k.startswith('fc') else 'attention'}.{k}.{own}"
              for i in range(2) for k in KINDS}
    shared = {"base_model.fact_U", "base_model.fact_V"} | ({"base_model.fact_C"} if fact_type == "tk" else set())
    assert keys == layers | shared
    loaded = PeftModel.from_pretrained(vit(), tmp_path)
    assert loaded.peft_config["default"].hidden_size == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=PIXELS).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("field, value", [("fact_type", "cp"), ("r", 0), ("scale", None), ("dropout", -0.1),
                                          ("hidden_size", 0)])
def test_bad_config_values(field, value):
    with pytest.raises(ConfigError, match=f"FacTConfig.{field}"):
        FacTConfig(**{field: value})


def test_unsupported_layer_fails_before_any_change():
    model = ConvNet()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetError, match="conv1"):
        get_peft_model(model, FacTConfig(target_modules=["conv1"]))
    assert {n: type(m) for n, m in model.named_modules()} == before
