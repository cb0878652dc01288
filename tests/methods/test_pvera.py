"""PVeRA beyond the parity table: config as peft's, the sampled latent (seeded, as peft's noise), the mean at
eval and in merges, Monte-Carlo inference, the shared projections reused from VeRA, and bad input."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.pvera import PveraAdapter, PveraConfig
from peftkit.methods.pvera import functional as PF

from ..families import FAMILY
from ..parity import TwoProjections, assert_same_outputs_and_grads, perturb
from ..parity import field_defaults

SHARED = {"base_model.pvera_A", "base_model.pvera_B"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False and Conv1D's fan_in_fan_out warn in both libraries
        yield


# -- config -----------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(PveraConfig) == field_defaults(peft.PveraConfig)
    cfg = PveraConfig()
    assert cfg.peft_type == "PVERA" and (cfg.r, cfg.d_initial, cfg.sample_at_inference, cfg.generator_seed) == (
        256, 0.1, False, None)
    PveraConfig(r=16, sample_at_inference=True, generator_seed=4, save_projection=False,
                target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    ref = peft.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(ref, peft.PveraConfig)
    assert (ref.r, ref.sample_at_inference, ref.generator_seed, ref.save_projection) == (16, True, 4, False)
    peft.PveraConfig(r=8, pvera_dropout=0.1, bias="pvera_only", generator_seed=2).save_pretrained(tmp_path / "b")
    back = peftkit.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, PveraConfig) and (back.r, back.pvera_dropout, back.bias, back.generator_seed) == (
        8, 0.1, "pvera_only", 2)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [({"r": 0}, "r", "> 0"), ({"r": 2.5}, "r", "integer"),
     ({"projection_prng_key": None}, "projection_prng_key", "integer"),
     ({"save_projection": "yes"}, "save_projection", "True or False"),
     ({"pvera_dropout": 1.0}, "pvera_dropout", r"\[0, 1\)"), ({"d_initial": "small"}, "d_initial", "number"),
     ({"bias": "vera_only"}, "bias", "pvera_only"), ({"init_weights": 0}, "init_weights", "True or False"),
     ({"sample_at_inference": "mc"}, "sample_at_inference", "True or False"),
     ({"generator_seed": 1.5}, "generator_seed", "integer or None"),
     ({"layers_pattern": "layers"}, "layers_pattern", "layers_to_transform")],
)
def test_bad_config_values_name_the_field(kwargs, field, expected):
    with pytest.raises(ConfigError, match=rf"PveraConfig\.{field}: .*{expected}"):
        PveraConfig(**kwargs)


# -- the math ---------------------------------------------------------------------------------------------
def test_projections_are_peft_bit_for_bit_and_twice_as_tall_as_vera():
    a, b = PF.pvera_projections(6, 37, 40, seed=3)
    g = torch.Generator().manual_seed(3)  # peft's _init_pvera_A_pvera_B
    ref_a = nn.init.kaiming_uniform_(torch.empty(12, 37), generator=g)
    ref_b = nn.init.kaiming_uniform_(torch.empty(40, 6), generator=g)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
    assert not torch.equal(PF.pvera_projections(6, 37, 40, seed=4)[0], a)


def test_latent_and_mean_delta_against_the_formula():
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 3, 5, 4
    a, b = torch.randn(2 * r, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, r, generator=g, dtype=torch.float64)
    lb, ld = torch.randn(d_out, generator=g, dtype=torch.float64), torch.randn(2 * r, generator=g, dtype=torch.float64)
    x, eps = torch.randn(7, d_in, generator=g, dtype=torch.float64), torch.randn(7, r, generator=g, dtype=torch.float64)
    h = x @ (torch.diag(ld) @ a).t()  # (7, 2r): [mu, logvar]
    mu, logvar = PF.pvera_latent_stats(x, a, ld)
    torch.testing.assert_close(mu, h[:, :r]) and torch.testing.assert_close(logvar, h[:, r:])
    torch.testing.assert_close(PF.pvera_mean_latent(x, a, ld), h[:, :r])
    z = PF.reparametrize(mu, logvar, eps)
    torch.testing.assert_close(z, h[:, :r] + eps * torch.sqrt(torch.exp(h[:, r:])))
    torch.testing.assert_close(PF.pvera_output(z, b, lb), z @ (torch.diag(lb) @ b).t())
    delta = PF.pvera_mean_delta(lb, ld, a, b)
    torch.testing.assert_close(delta, torch.diag(lb) @ b @ torch.diag(ld[:r]) @ a[:r])
    torch.testing.assert_close(x @ delta.t(), PF.pvera_output(PF.pvera_mean_latent(x, a, ld), b, lb))


@pytest.mark.parametrize("base", [nn.Linear(6, 5), Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_adapter_eval_is_the_mean_and_training_samples_seeded_noise(base):
    torch.manual_seed(0)
    adapter = PveraAdapter(base, PveraConfig(r=3, init_weights=False, generator_seed=9))
    assert adapter.pvera_lambda_b.shape == (5,) and adapter.pvera_lambda_d.shape == (6,)
    assert adapter.shared.pvera_A.shape == (6, 6) and adapter.shared.pvera_B.shape == (5, 3)
    x = torch.randn(4, 6)
    delta = adapter.delta_weight(base)
    assert delta.shape == base.weight.shape
    dense = delta if isinstance(base, nn.Linear) else delta.t()
    adapter.eval()
    torch.testing.assert_close(adapter(base, x, base(x)), base(x) + x @ dense.t(), atol=1e-6, rtol=1e-6)
    adapter.train()
    sampled = adapter(base, x, torch.zeros(4, 5))
    a, b = adapter.shared.pvera_A, adapter.shared.pvera_B
    mu, logvar = PF.pvera_latent_stats(x, a, adapter.pvera_lambda_d)
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(9))  # the layer's generator, first draw
    torch.testing.assert_close(sampled, adapter.pvera_lambda_b * ((mu + eps * (0.5 * logvar).exp()) @ b.t()))
    assert not torch.allclose(adapter(base, x, torch.zeros(4, 5)), sampled)  # the generator moved on


def test_init_starts_at_base_with_d_initial():
    adapter = PveraAdapter(nn.Linear(8, 6), PveraConfig(r=4, d_initial=0.3))
    assert torch.equal(adapter.pvera_lambda_b, torch.zeros(6))
    assert torch.equal(adapter.pvera_lambda_d, torch.full((8,), 0.3))
    assert PveraAdapter.param_count(nn.Linear(8, 6), PveraConfig(r=4)) == 2 * 4 + 6


# -- randomness, as peft ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [None, 3])
def test_training_samples_and_gradients_equal_peft(seed):
    """Same draws as peft, from each layer's seeded generator or from the global one (reseeded per call)."""
    kw = dict(r=4, target_modules=["query", "value"], init_weights=False, generator_seed=seed)
    torch.manual_seed(0)
    ref = peft.get_peft_model(TwoProjections(), peft.PveraConfig(**kw)).train()
    torch.manual_seed(0)  # the same base and, as peft draws d when building a layer, the same random d
    ours = peftkit.get_peft_model(TwoProjections(), PveraConfig(**kw)).train()
    x = torch.randn(3, 5, 12)
    if seed is None:
        torch.manual_seed(7)
        y_ref = ref(x)
        torch.manual_seed(7)
        torch.testing.assert_close(ours(x), y_ref, atol=0, rtol=0)
    else:
        assert_same_outputs_and_grads(ref, ours, x, min_params=4, tol=1e-6)
        assert_same_outputs_and_grads(ref, ours, x, min_params=4, tol=1e-6)  # both generators advanced alike


def test_eval_is_deterministic_and_sample_at_inference_averages_to_the_mean():
    family = FAMILY["llama"]
    kw = dict(r=4, init_weights=False, generator_seed=5)
    torch.manual_seed(0)
    mean_model = peftkit.get_peft_model(family.model(), PveraConfig(**kw)).eval()
    torch.manual_seed(0)
    mc = peftkit.get_peft_model(family.model(), PveraConfig(sample_at_inference=True, **kw)).eval()
    torch.manual_seed(0)
    ref = peft.get_peft_model(family.model(), peft.PveraConfig(sample_at_inference=True, **kw)).eval()
    ids = torch.randint(0, 90, (1, 3))
    with torch.no_grad():
        expected = mean_model(input_ids=ids).logits
        torch.testing.assert_close(mean_model(input_ids=ids).logits, expected, atol=0, rtol=0)
        first = mc(input_ids=ids).logits
        torch.testing.assert_close(first, ref(input_ids=ids).logits, atol=1e-6, rtol=0)  # peft's draws
        assert (first - expected).abs().max() > 1e-2
        # one layer: the output is linear in z, so Monte-Carlo averaging converges to the mean path
        path, layer = next(iter(mc.base_model.adapter_layers()))
        x = torch.randn(2, layer.base_layer.in_features)
        runs = layer(x.expand(4000, 2, -1))  # one independent draw per row
        mean_out = mean_model.base_model.model.get_submodule(path)(x)
        spread = runs.std(0).max()
        assert spread > 1e-2 and (runs.mean(0) - mean_out).abs().max() < 5 * spread / 4000 ** 0.5


def test_merge_folds_the_mean_path():
    family = FAMILY["gpt2"]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(family.model(), PveraConfig(r=4, init_weights=False)).eval()
    unmerged = family.run(model)
    path, layer = next(iter(model.base_model.adapter_layers()))
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.adapters["default"].delta_weight(layer.base_layer)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta, atol=0, rtol=0)
    torch.testing.assert_close(family.run(model), unmerged, atol=1e-5, rtol=1e-5)


# -- files and the shared projections -----------------------------------------------------------------------
def test_layers_share_one_pair_sized_for_the_largest_target():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), PveraConfig(r=4, target_modules=["v_proj", "down_proj"]))
    shared = model.base_model.shared_state["default"]
    a, b = PF.pvera_projections(4, 37, 32, seed=0)  # max d_in 37, max d_out 32
    assert torch.equal(shared.pvera_A, a) and torch.equal(shared.pvera_B, b)
    assert all(layer.adapters["default"].shared is shared for _, layer in model.base_model.adapter_layers())
    assert [k for k in model.state_dict() if k.endswith("pvera_A")] == ["base_model.shared_state.default.pvera_A"]


@pytest.mark.parametrize("save", [True, False])
def test_projections_saved_or_regenerated_and_read_by_peft(tmp_path, save):
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), PveraConfig(r=8, save_projection=save, projection_prng_key=9))
    model.eval()  # as in peft, a new adapter is in training mode (sampling); loaded ones are in eval mode
    perturb(model, only="pvera_lambda")
    if save:  # projections the seed cannot reproduce: only the file knows them
        with torch.no_grad():
            model.base_model.shared_state["default"].pvera_A.mul_(-2.0)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert (SHARED <= keys) == save and sum(".pvera_lambda_" in k for k in keys) == 8
    expected = family.run(model)
    torch.testing.assert_close(family.run(peftkit.PeftModel.from_pretrained(family.model(), tmp_path)), expected,
                               atol=0, rtol=0)
    torch.testing.assert_close(family.run(peft.PeftModel.from_pretrained(family.model(), tmp_path)), expected,
                               atol=1e-5, rtol=0)


def test_a_second_adapter_reuses_the_projections_and_incompatible_ones_change_nothing():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), PveraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    model.add_adapter("two", PveraConfig(r=4, target_modules=["v_proj"]))
    first, second = (model.base_model.shared_state[n] for n in ("default", "two"))
    assert torch.equal(first.pvera_A, second.pvera_A) and second.pvera_A.shape == (8, 37)
    for kw, match in [({"r": 2}, r"PveraConfig\.r: 2 differs from the rank 4"),
                      ({"projection_prng_key": 1}, r"PveraConfig\.projection_prng_key: 1 differs .*PVeRA adapters")]:
        with pytest.raises(ValueError, match=match):
            model.add_adapter("three", PveraConfig(target_modules=["v_proj"], **{"r": 4, **kw}))
        assert list(model.peft_config) == ["default", "two"] and list(model.base_model.shared_state) == ["default", "two"]


def test_unsupported_layer_is_refused_and_the_model_left_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1), nn.Embedding(5, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in ("1", "2"):
        with pytest.raises((TypeError, ValueError), match=target):
            peftkit.get_peft_model(model, PveraConfig(r=2, target_modules=["0", target]))
        assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dinov2_defaults_to_query_and_value_as_peft():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)
    config = PveraConfig(r=2)
    model = peftkit.get_peft_model(Dinov2Model(cfg), config)
    paths = sorted(n.rsplit(".", 1)[1] for n, _ in model.base_model.adapter_layers())
    assert paths in (["q_proj", "q_proj", "v_proj", "v_proj"], ["query", "query", "value", "value"])
    assert config.target_modules is None
