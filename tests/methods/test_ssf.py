"""SSF: the scale-and-shift formula, its re-parameterization into the preceding layer, targets and config."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.ssf import SSFAdapter, SSFConfig, layer_norm_names, ssf_apply, ssf_merge_bias, ssf_merge_weight
from peftkit.targeting import TargetError

from ..families import FAMILY, ConvNet
from ..parity import perturb


def _conv1d(d_in: int, d_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(d_out, d_in)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def _layers():
    """(layer, input, hand-computed op(x) with channels last) for every supported kind."""
    torch.manual_seed(0)
    lin, nobias, c1d = nn.Linear(6, 5), nn.Linear(6, 5, bias=False), _conv1d(6, 5)
    conv, ln, plain_ln = nn.Conv2d(4, 3, 3, padding=1), nn.LayerNorm(5), nn.LayerNorm(5, elementwise_affine=False)
    grouped = nn.Conv2d(4, 6, 3, groups=2)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x, img = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    xn = torch.randn(2, 3, 5, dtype=torch.float64)

    def layer_norm(module, t):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        h = (t - mu) / torch.sqrt(var + module.eps)
        return h * module.weight + module.bias if module.weight is not None else h

    def conv2d(module, t):  # explicit sum over the window: (N, H, W, C_out), channels last
        k, g = module.kernel_size[0], module.groups
        cols = torch.nn.functional.unfold(t, k, padding=module.padding)  # (N, C_in k k, L)
        n_out = t.shape[-1] + 2 * module.padding[0] - k + 1
        per_in, per_out = module.in_channels // g, module.out_channels // g
        cols = cols.reshape(t.shape[0], g, per_in * k * k, -1)
        w = module.weight.reshape(g, per_out, per_in * k * k)
        out = torch.einsum("ngil,goi->nlgo", cols, w).reshape(t.shape[0], n_out, n_out, -1)
        return out + module.bias

    layers = [
        (lin, x, lambda m, t: t @ m.weight.t() + m.bias),
        (nobias, x, lambda m, t: t @ m.weight.t()),
        (c1d, x, lambda m, t: t @ m.weight + m.bias),
        (conv, img, conv2d),
        (grouped, img, conv2d),
        (ln, xn, layer_norm),
        (plain_ln, xn, layer_norm),
    ]
    return [(m.double(), t, fn) for m, t, fn in layers]


# -- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [({"init_weights": "normal"}, "init_weights", "True or False"),
     ({"target_modules": 3}, "target_modules", "list of names"),
     ({"exclude_modules": 1.5}, "exclude_modules", "list of names"),
     ({"target_modules": ".*fc1", "layers_to_transform": [0]}, "layers_to_transform", "regex"),
     ({"layers_pattern": "layers"}, "layers_pattern", "layers_to_transform")],
)
def test_config_validation_names_the_field(kwargs, field, expected):
    with pytest.raises(ConfigError, match=rf"SSFConfig\.{field}.*{expected}"):
        SSFConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = SSFConfig(target_modules={"fc1", "fc2"}, layers_to_transform=[1], init_weights=False)
    assert cfg.target_modules == {"fc1", "fc2"} and cfg.peft_type == "SSF"
    cfg.save_pretrained(tmp_path)
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, SSFConfig) and back.to_dict() == cfg.to_dict()


# -- the formula ----------------------------------------------------------------------------------------------
def test_y_is_gamma_times_op_plus_beta_by_hand():
    for base, x, op in _layers():
        adapter = SSFAdapter(base, SSFConfig()).double()  # an affine-free LayerNorm has no dtype to follow
        gamma = torch.rand(adapter.ssf_scale.shape, dtype=torch.float64) + 0.5
        beta = torch.randn(adapter.ssf_shift.shape, dtype=torch.float64)
        with torch.no_grad():
            adapter.ssf_scale.copy_(gamma)
            adapter.ssf_shift.copy_(beta)
        got = adapter(base, x, base(x))
        if isinstance(base, nn.Conv2d):
            got = got.permute(0, 2, 3, 1)  # channels last, as the hand computation
        expected = op(base, x)
        expected = torch.stack([gamma[c] * expected[..., c] + beta[c] for c in range(gamma.numel())], -1)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, msg=type(base).__name__)


def test_identity_at_init_and_paper_init_with_init_weights_false():
    base = nn.Linear(400, 300)
    a = SSFAdapter(base, SSFConfig())
    assert torch.equal(a.ssf_scale, torch.ones(300)) and torch.equal(a.ssf_shift, torch.zeros(300))
    x = torch.randn(2, 400)
    assert torch.equal(a(base, x, base(x)), base(x))
    torch.manual_seed(0)
    b = SSFAdapter(base, SSFConfig(init_weights=False))
    assert abs(b.ssf_scale.mean() - 1) < 0.01 and abs(b.ssf_scale.std() - 0.02) < 0.005
    assert abs(b.ssf_shift.mean()) < 0.01 and abs(b.ssf_shift.std() - 0.02) < 0.005


def test_pure_functions():
    w, b = torch.randn(3, 4), torch.randn(3)
    g, s = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(ssf_merge_weight(w, g, 0), torch.diag(g) @ w)
    torch.testing.assert_close(ssf_merge_weight(w.t(), g, 1), (torch.diag(g) @ w).t())  # Conv1D layout
    torch.testing.assert_close(ssf_merge_bias(b, g, s), g * b + s)
    x = torch.randn(5, 4)
    # reparameterization: the merged affine map is the scaled-and-shifted one
    torch.testing.assert_close(x @ ssf_merge_weight(w, g, 0).t() + ssf_merge_bias(b, g, s), ssf_apply(x @ w.t() + b, g, s))
    torch.testing.assert_close(ssf_apply(torch.ones(2, 3, 4, 4), g, s, axis=-3)[:, :, 1, 2], (g + s).expand(2, 3))


# -- merging ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(7))
def test_merged_layer_equals_unmerged_and_unmerge_restores_it(index):
    base, x, _ = _layers()[index]
    layer = peftkit.AdapterLayer(base)
    layer.add("default", SSFAdapter(base, SSFConfig()).double())
    layer.set_active(["default"])
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.ssf_scale.copy_(torch.rand(adapter.ssf_scale.shape) + 0.5)
        adapter.ssf_scale.view(-1)[0] = 0.0  # a zero scale cannot be divided out; still restored exactly
        adapter.ssf_shift.normal_()
    had = {n: getattr(base, n) is not None for n in ("weight", "bias")}
    before = {n: p.clone() for n, p in base.named_parameters()}
    expected = layer(x)
    layer.merge()
    # the shift needs a bias: a bias-free layer (and an affine-free LayerNorm, a weight too) gets one
    assert base.bias is not None and base.weight is not None
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(base(x), expected, atol=1e-12, rtol=1e-12)
    layer.unmerge()
    assert {n: getattr(base, n) is not None for n in ("weight", "bias")} == had
    after = dict(base.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_merge_and_unload_on_a_bias_free_model_keeps_outputs():
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), SSFConfig())
    perturb(model, scale=0.3, only="ssf_")
    expected = family.run(model)
    plain = model.merge_and_unload()
    torch.testing.assert_close(family.run(plain), expected, atol=1e-5, rtol=1e-5)
    assert plain.model.layers[0].self_attn.q_proj.bias is not None  # the shift lives in the new bias


# -- targets and parameter count -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "linear", "norms"),
    [("vit", 12, 5), ("gpt2", 8, 5), ("bert", 12, 5), ("llama", 14, 0), ("clip", 24, 11), ("unet", 40, 12)],
)
def test_default_targets_are_attention_mlp_and_layernorms(name, linear, norms):
    family = FAMILY[name]
    model = peftkit.get_peft_model(family.model(), SSFConfig(task_type=family.task_type))
    bases = [layer.base_layer for _, layer in model.base_model.adapter_layers()]
    assert sum(isinstance(b, nn.LayerNorm) for b in bases) == norms
    assert sum(not isinstance(b, nn.LayerNorm) for b in bases) == linear
    # written into the config, so the saved adapter names its targets
    assert isinstance(model.peft_config["default"].target_modules, list)
    expected = sum(SSFAdapter.param_count(b, None) for b in bases)
    heads = sum(p.numel() for _, w in model.base_model.saved_modules() for p in w.modules_to_save["default"].parameters())
    assert model.get_nb_trainable_parameters()[0] == expected + heads


def test_param_count_closed_form():
    widths = {"linear": (nn.Linear(7, 5), 5), "conv": (nn.Conv2d(3, 8, 3), 8), "norm": (nn.LayerNorm(6), 6),
              "conv1d": (_conv1d(4, 9), 9)}
    for kind, (base, d_out) in widths.items():
        adapter = SSFAdapter(base, SSFConfig())
        assert SSFAdapter.param_count(base, SSFConfig()) == 2 * d_out == sum(p.numel() for p in adapter.parameters()), kind
    model = peftkit.get_peft_model(ConvNet(), SSFConfig(target_modules=["conv1", "conv2", "head"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * (8 + 8 + 4)


def test_layer_norm_names_disambiguate_from_other_norms():
    names = layer_norm_names(list(FAMILY["unet"].model().named_modules()))
    # "norm1" alone would also match the resnets' GroupNorms
    assert names == ["transformer_blocks.0.norm1", "transformer_blocks.0.norm2", "norm3"]


def test_layers_to_transform_and_unknown_architectures():
    family = FAMILY["vit"]
    model = peftkit.get_peft_model(family.model(), SSFConfig(layers_to_transform=[1]))
    paths = [p for p, _ in model.base_model.adapter_layers()]
    assert paths and all(".1." in p for p in paths)  # the final LayerNorm has no layer index: excluded
    with pytest.raises(TargetError, match="target_modules"):
        peftkit.get_peft_model(ConvNet(), SSFConfig())


def test_save_load_round_trip_and_file_keys(tmp_path):
    family = FAMILY["gpt2"]
    model = peftkit.get_peft_model(family.model(), SSFConfig())
    perturb(model, scale=0.3, only="ssf_")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.ln_1.ssf_scale" in state
    assert "base_model.model.transformer.h.0.attn.c_attn.ssf_shift" in state
    assert state["base_model.model.transformer.h.0.mlp.c_fc.ssf_scale"].shape == (4 * 32,)
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), family.run(model), atol=0, rtol=0)
