"""TinyLoRA: config compatibility with Hugging Face PEFT, the SVD frame and the mixed core, vector groups
(weight tying), the projections' file round trip, and bad input."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import tiny_models
from peftkit.config import ConfigError
from peftkit.methods.tinylora import TinyLoraAdapter, TinyLoraConfig
from peftkit.methods.tinylora import functional as TF

from ..parity import TwoProjections
from ..parity import field_defaults
from ..saved import saved_shapes
from tests.families import untouched


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(TinyLoraConfig) == field_defaults(peft.TinyLoraConfig)
    peft.TinyLoraConfig(r=3, u=5, weight_tying=0.25, init_weights="uniform").save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, TinyLoraConfig) and (loaded.r, loaded.u, loaded.weight_tying) == (3, 5, 0.25)
    assert loaded.init_weights == "uniform"
    TinyLoraConfig(u=7, projection_seed=3, bias="tinylora_only").save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.TinyLoraConfig)
    assert (back.u, back.projection_seed, back.bias) == (7, 3, "tinylora_only")


@pytest.mark.parametrize("bad", [{"r": 0}, {"u": 0}, {"weight_tying": 1.5}, {"weight_tying": -0.1},
                                 {"tinylora_dropout": 1.0}, {"bias": "lora_only"}, {"init_weights": "gaussian"},
                                 {"init_weights": 1}, {"init_v_bound": -1.0}, {"projection_seed": 1.5},
                                 {"save_projection": "yes"}, {"layers_pattern": "layers"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        TinyLoraConfig(**bad)


def test_svd_frame_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    w = torch.randn(9, 6)
    a, b = TF.svd_frame(w, 2)
    assert a.shape == (2, 6) and b.shape == (9, 2)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.norm(dim=1), s[:2].sqrt(), atol=1e-5, rtol=1e-5)  # sqrt S on both sides
    torch.testing.assert_close(b.norm(dim=0), s[:2].sqrt(), atol=1e-5, rtol=1e-5)
    assert TF.svd_frame(w, 10)[0].shape == (6, 6)  # the rank is capped by the shape


def test_forward_and_merge_equal_the_direct_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    ad = TinyLoraAdapter(base, TinyLoraConfig(r=3, u=5, init_weights="uniform", init_v_bound=0.3))
    v, p, a, b = ad.tinylora_v, ad.tinylora_P, ad.tinylora_A, ad.tinylora_B
    assert p.shape == (5, 3, 3) and v.shape == (5,) and v.abs().max() <= 0.3
    r_mat = sum(v[i] * p[i] for i in range(5))
    delta = b @ r_mat @ a
    x = torch.randn(4, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(ad.delta_weight(base), delta, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ad(base, x, base(x)), F.linear(x, base.weight + delta, base.bias),
                                   atol=1e-5, rtol=1e-5)
    # the projections: seed + the layer's index, entries N(0, 1 / r)
    torch.testing.assert_close(p, torch.normal(0.0, 3 ** -0.5, (5, 3, 3), generator=torch.Generator().manual_seed(42)))


def test_conv1d_and_embedding_layouts():
    torch.manual_seed(0)
    conv, lin = Conv1D(6, 10), nn.Linear(10, 6)  # Conv1D weight (10, 6): d_in 10, d_out 6
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    cfg = TinyLoraConfig(u=3, init_weights="uniform")
    torch.manual_seed(1)
    ours = TinyLoraAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = TinyLoraAdapter(lin, cfg)
    assert ours.tinylora_A.shape == (2, 10) and ours.tinylora_B.shape == (6, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())
        x = torch.randn(2, 10)
        torch.testing.assert_close(ours(conv, x, conv(x)), ref(lin, x, lin(x)), atol=1e-6, rtol=1e-6)
    emb = nn.Embedding(11, 5)  # W is the (11, 5) table itself
    ad = TinyLoraAdapter(emb, cfg)
    assert ad.tinylora_A.shape == (2, 5) and ad.tinylora_B.shape == (11, 2)
    ids = torch.tensor([[0, 3, 10], [7, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ad(emb, ids, emb(ids)), F.embedding(ids, emb.weight + ad.delta_weight(emb)),
                                   atol=1e-6, rtol=1e-6)


def test_outputs_and_gradients_equal_peft_layers():
    torch.manual_seed(0)
    net = TwoProjections()
    cfg = dict(r=2, u=4, target_modules=["query", "value"], init_weights="uniform", init_v_bound=0.5)
    torch.manual_seed(3)
    ref = peft.get_peft_model(_copy(net), peft.TinyLoraConfig(**cfg))
    torch.manual_seed(3)
    ours = peftkit.get_peft_model(_copy(net), TinyLoraConfig(**cfg))
    results = []
    for model in (ref, ours):
        x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        y = model(x)
        (y * torch.linspace(-1, 2, y.shape[-1])).sum().backward()
        vectors = [p for p in model.parameters() if p.requires_grad]  # group order in both (query, value)
        results.append((y.detach(), x.grad, [p.detach() for p in vectors], [p.grad for p in vectors]))
    (y_ref, gx_ref, v_ref, g_ref), (y, gx, v, g) = results
    assert len(v) == len(v_ref) == 2 and all(torch.equal(a, b) for a, b in zip(v, v_ref))  # the same draws
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(g, g_ref):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _copy(net):
    out = TwoProjections()
    out.load_state_dict(net.state_dict())
    return out


@pytest.mark.parametrize(("n", "tying", "groups"), [(4, 0.0, [0, 1, 2, 3]), (4, 0.5, [0, 0, 1, 1]),
                                                     (5, 0.5, [0, 0, 1, 1, 1]), (4, 1.0, [0, 0, 0, 0]),
                                                     (7, 0.7, [0, 0, 0, 1, 1, 1, 1])])
def test_vector_groups(n, tying, groups):
    assert [TF.group_of(i, n, tying) for i in range(n)] == groups
    assert TF.num_groups(n, tying) == len(set(groups))


def test_tied_vectors_are_one_parameter_counted_once():
    targets = ["q_proj", "k_proj", "v_proj"]  # 6 layers on the tiny Llama, tying 0.5: 3 groups of 2
    model = peftkit.get_peft_model(tiny_models.llama(), TinyLoraConfig(u=5, weight_tying=0.5, target_modules=targets))
    layers = [layer.adapters["default"] for _, layer in model.base_model.adapter_layers()]
    assert len(layers) == 6
    assert [id(a.tinylora_v) for a in layers[::2]] == [id(a.tinylora_v) for a in layers[1::2]]
    assert len({id(a.tinylora_v) for a in layers}) == 3
    assert model.get_nb_trainable_parameters()[0] == 3 * 5
    state = peftkit.get_peft_model_state_dict(model)
    assert sorted(k for k in state if "tinylora_v" in k) == [f"base_model.tinylora_v.{g}" for g in range(3)]


def test_projections_regenerated_when_not_saved(tmp_path):
    cfg = dict(u=4, target_modules=["q_proj", "v_proj"], projection_seed=11, init_weights="uniform")
    with pytest.warns(UserWarning, match="save_projection"):
        config = TinyLoraConfig(save_projection=False, **cfg)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(tiny_models.llama(), config)
    ids = torch.randint(0, tiny_models.VOCAB, (2, 5))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert not any(k.endswith(".tinylora_P") for k in keys) and any(k.endswith(".tinylora_A") for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        loaded = peftkit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="save_projection"):  # all TinyLoRA adapters save P, or none (as peft)
        model.add_adapter("two", TinyLoraConfig(**cfg))
    assert list(model.peft_config) == ["default"]


def test_half_precision_base_trains_in_float32():
    model = tiny_models.llama().to(torch.bfloat16)
    model = peftkit.get_peft_model(model, TinyLoraConfig(u=3, target_modules=["q_proj"], init_weights="uniform"))
    ad = next(layer.adapters["default"] for _, layer in model.base_model.adapter_layers())
    assert ad.tinylora_v.dtype == torch.float32 and ad.tinylora_A.dtype == torch.bfloat16  # PEFT's file dtypes
    out = model(input_ids=torch.randint(0, tiny_models.VOCAB, (2, 5))).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert ad.tinylora_v.grad is not None and ad.tinylora_v.grad.abs().sum() > 0


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises((TypeError, ValueError), match="'1' is a Conv2d; this method wraps Linear, Conv1D, Embedding"):
        peftkit.get_peft_model(model, TinyLoraConfig(u=2, target_modules=["0", "1"]))


def test_backward_keeps_only_thin_products_of_the_input():
    """A is frozen, so x A^T is computed first: autograd keeps (n, r) products, never the (n, d_in) input (folding
    R into A first, (R A) x^T, would keep x for R's gradient)."""
    model = peftkit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 20)),
                                   TinyLoraConfig(r=2, u=4, target_modules=["0"])).train()
    x = torch.randn(16, 24, requires_grad=True)
    saved = saved_shapes(lambda: model(x).sum().backward(), model, buffers=True)
    assert saved and all(shape[-1] <= 2 or shape[0] <= 2 for shape in saved), saved
