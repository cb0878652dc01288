"""RoAd: config compatibility with Hugging Face PEFT, the rotation's math, bad input, mixed-adapter batches."""

from __future__ import annotations


import peft
import pytest
import torch
from peft.tuners.road.layer import _apply_road, _get_delta_weight, _prepare_cols
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.road import RoadAdapter, RoadConfig
from peftkit.methods.road import functional as RF

from ..families import FAMILY, V
from ..parity import linearized
from ..parity import field_defaults

BASE = "__base__"


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(RoadConfig) == field_defaults(peft.RoadConfig)
    peft.RoadConfig(variant="road_4", group_size=16, target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, RoadConfig) and (loaded.variant, loaded.group_size) == ("road_4", 16)
    assert loaded.target_modules == {"q_proj"}
    RoadConfig(variant="road_2", group_size=8, init_weights=False).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.RoadConfig) and (back.variant, back.group_size, back.init_weights) == ("road_2", 8, False)


@pytest.mark.parametrize("bad", [{"variant": "road_3"}, {"group_size": 0}, {"group_size": 7}, {"group_size": -2},
                                 {"group_size": 4.0}, {"init_weights": "yes"}])
def test_bad_config_values(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=f"RoadConfig.{field}"):
        RoadConfig(**bad)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_rotation_against_the_2x2_formula_and_peft(variant):
    torch.manual_seed(0)
    d, g = 24, 8
    size = RF.param_size(variant, d)
    theta, alpha = torch.randn(size), torch.randn(size) + 1
    first, second = RF.road_cols(variant, g, theta, alpha)
    ref_first, ref_second = _prepare_cols(variant, g, theta, alpha)
    torch.testing.assert_close(first, ref_first, atol=0, rtol=0)
    torch.testing.assert_close(second, ref_second, atol=0, rtol=0)
    # the 2x2 block of pair (i, i + g/2) of group k, written out from the paper / peft's docstring
    k, i = 1, 2
    p, q = k * g + i, k * g + i + g // 2
    if variant == "road_1":
        t, a = theta[k * g // 2 + i], alpha[k * g // 2 + i]
        block = a * torch.tensor([[t.cos(), -t.sin()], [t.sin(), t.cos()]])
    elif variant == "road_2":
        block = torch.stack([torch.stack([alpha[p] * theta[p].cos(), -alpha[p] * theta[p].sin()]),
                             torch.stack([alpha[q] * theta[q].sin(), alpha[q] * theta[q].cos()])])
    else:  # per group: g diagonal angles / scales, then g off-diagonal ones
        dg, od = 2 * g * k, 2 * g * k + g
        block = torch.stack([
            torch.stack([alpha[dg + i] * theta[dg + i].cos(), -alpha[od + i] * theta[od + i].sin()]),
            torch.stack([alpha[od + i + g // 2] * theta[od + i + g // 2].sin(),
                         alpha[dg + i + g // 2] * theta[dg + i + g // 2].cos()])])
    r = RF.road_matrix(first, second, g)
    torch.testing.assert_close(r[[p, q]][:, [p, q]], block)
    assert torch.count_nonzero(r) == 2 * d  # two entries per row: a rotation of pairs, nothing else
    torch.testing.assert_close(r, _get_delta_weight(variant, g, theta, alpha), atol=0, rtol=0)
    h = torch.randn(3, 5, d)
    expected = h @ r.t()
    torch.testing.assert_close(RF.rotate(h, first, RF.signed(second, g), g), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_apply_road(variant, g, theta, alpha, h), expected, atol=1e-6, rtol=1e-6)
    inv = RF.road_matrix(*RF.inverse_cols(first, second, g), g)
    torch.testing.assert_close(inv @ r, torch.eye(d), atol=1e-5, rtol=0)


def test_autograd_function_gradients_and_saved_tensors():
    """RoadRotate's backward equals autograd through the plain formula, per-row (broadcast) diagonals included;
    it keeps the layer output only (the plain formula also keeps its swapped copy)."""
    torch.manual_seed(0)
    d, g = 16, 4
    for shape in [(d,), (3, 1, d)]:
        h = torch.randn(3, 5, d, requires_grad=True)
        first, q = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
        w = torch.randn(3, 5, d)
        ours = torch.autograd.grad((RF.RoadRotate.apply(h, first, q, g // 2) * w).sum(), (h, first, q))
        plain = h * first + h.unflatten(-1, (-1, 2, g // 2)).flip(-2).flatten(-3) * q
        ref = torch.autograd.grad((plain * w).sum(), (h, first, q))
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        RF.rotate(h, first.detach()[0, 0].requires_grad_(), q.detach()[0, 0], g)
    assert saved == [h.shape, (d,), (d,)]


def test_param_count_and_file_keys():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), RoadConfig(group_size=8, variant="road_4"))
    # q_proj: 32 outputs, v_proj: 16 (2 key-value heads of 8); road_4: 2 d_out angles + 2 d_out scales
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * (32 + 16)
    keys = set(peftkit.get_peft_model_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.road_theta" in keys and len(keys) == 8
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert RoadAdapter.param_count(layer.base_layer, RoadConfig(group_size=8)) == 16
    assert layer.road_alpha["default"] is layer.adapters["default"].road_alpha  # peft's layer API, as a view


def test_conv1d_merge_in_base_layout_equals_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 10)  # weight (10, 12): d_in 10, d_out 12
    lin = nn.Linear(10, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    cfg = RoadConfig(group_size=4, variant="road_2", init_weights=False)
    torch.manual_seed(1)
    ours = RoadAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = RoadAdapter(lin, cfg)
    merged, _ = ours.merge(conv, conv.weight.detach())
    torch.testing.assert_close(merged, ref.merge(lin, lin.weight.detach())[0].t())
    r = RF.road_matrix(*ref.cols(), 4)
    torch.testing.assert_close(ref.merge(lin, lin.weight.detach())[0], r @ lin.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.merge_param(conv, "bias", conv.bias.detach()), r @ conv.bias, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(ours(conv, x, conv(x)), ref(lin, x, lin(x)), atol=1e-6, rtol=1e-6)


def test_unsupported_layer_or_group_size_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.Conv2d(8, 4, 1), nn.Linear(8, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((TypeError, ValueError)):
        peftkit.get_peft_model(model, RoadConfig(group_size=2, target_modules=["0", "1"]))
    with pytest.raises(ConfigError, match=r"2: RoadConfig.group_size=4 .* \(6\).* \[2, 6\]"):
        peftkit.get_peft_model(model, RoadConfig(group_size=4, target_modules=["0", "2"]))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- mixed-adapter batches --------------------------------------------------------------------------------
ADAPTERS = {"default": {"variant": "road_1"}, "r2": {"variant": "road_2"},
            "r4": {"variant": "road_4", "target_modules": ["q_proj", "o_proj"]}, "r1b": {"variant": "road_1"}}


def _build(lib, family="llama", model=None):
    model = FAMILY[family].model() if model is None else model
    for k, (name, kw) in enumerate(ADAPTERS.items()):
        kw = {"group_size": 8, "init_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"], **kw}
        if family == "gpt2":
            kw["target_modules"] = ["c_attn", "c_proj"]
        torch.manual_seed(10 + k)
        if k == 0:
            model = lib.get_peft_model(model, lib.RoadConfig(**kw))
        else:
            model.add_adapter(name, lib.RoadConfig(**kw))
    return model.eval()


def _row_alone(model, name, ids):
    if name == BASE:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(name)
    return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_adapter_alone(family, monkeypatch):
    model = _build(peftkit, family)
    names = ["r2", BASE, "default", "r4", "r1b", "default", BASE, "r2"]
    ids = torch.randint(0, V, (len(names), 6))
    with torch.no_grad():
        expected = [_row_alone(model, n, ids[i : i + 1])[0] for i, n in enumerate(names)]
        with monkeypatch.context() as m:  # the batched path, never the per-adapter loop
            m.setattr(RoadAdapter, "forward", lambda *a: (_ for _ in ()).throw(AssertionError("loop ran")))
            mixed = model(input_ids=ids, adapter_names=names).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5, msg=f"row {i} ({n})")
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the adapters act


def test_mixed_batch_equals_peft_with_the_same_loaded_adapters(tmp_path):
    theirs = _build(peft)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path)
    for name in list(ADAPTERS)[1:]:
        ours.load_adapter(tmp_path / name, adapter_name=name)
    ours.eval()
    names = ["r4", "default", BASE, "r2", "r1b", "r4", "r2", BASE]
    ids = torch.randint(0, V, (len(names), 7))
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=names).logits
        got = ours(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixed_group_sizes_fall_back_and_gradients_match_the_loop(monkeypatch):
    names = ["r2", "default", BASE, "r2", "odd"]
    ids = torch.randint(0, V, (len(names), 5))

    def run(batched):
        model = _build(peftkit)
        torch.manual_seed(3)
        model.add_adapter("odd", RoadConfig(group_size=4, init_weights=False, target_modules=["q_proj"]))
        model.base_model.mark_trainable(extra=["r2", "default", "odd"])
        with monkeypatch.context() as m:
            if not batched:
                m.setattr(RoadAdapter, "batched_forward", classmethod(lambda cls, *a: None))
            out = model(input_ids=ids, adapter_names=names).logits
            out.square().mean().backward()
        return out.detach(), {f"{p}.{n}": (a.road_theta.grad, a.road_alpha.grad)
                              for n in ("r2", "default") for p, a in model.base_model.adapters(n)}

    (out_b, g_b), (out_l, g_l) = run(True), run(False)
    torch.testing.assert_close(out_b, out_l, atol=1e-5, rtol=1e-5)
    assert g_b.keys() == g_l.keys() and all(g[0].abs().sum() > 0 for g in g_l.values())
    for key in g_l:
        for a, b in zip(g_b[key], g_l[key]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)


def test_gpt2_conv1d_loads_peft_adapter_of_linearized_model(tmp_path):
    """peft cannot wrap Conv1D; its adapter for the equivalent Linear GPT-2 gives the same outputs here."""
    family = FAMILY["gpt2"]
    torch.manual_seed(2)
    theirs = peft.get_peft_model(linearized(family.model()), peft.RoadConfig(group_size=8, init_weights=False,
                                                                             target_modules=["c_attn", "c_fc"]))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)


def test_merge_unmerge_bit_exact_with_a_singular_block():
    """A zero scale makes a 2x2 block singular: merged == unmerged still, and unmerge restores the weight bit for
    bit (the closed-form inverse gives zeros there; the wrapper's exact-restore record fills them in)."""
    family = FAMILY["bert"]
    model = peftkit.get_peft_model(family.model(), RoadConfig(group_size=8, variant="road_2", init_weights=False,
                                                               task_type="SEQ_CLS"))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.adapters["default"].road_alpha[[0, 4]] = 0.0  # both rows of the first pair
        layer.base_layer.bias.normal_()
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    x = torch.randn(2, 3, 32)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged[..., 0], torch.zeros(2, 3))
    torch.testing.assert_close(RF.road_apply(layer.base_layer(x), *layer.adapters["default"].cols(), 8), unmerged)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert all(torch.equal(before[k], v) for k, v in layer.base_layer.state_dict().items())
