"""AdaMSS: config compatibility with Hugging Face PEFT, the SVD / clustering initialisation against PEFT's layer,
the update against a direct formula, the ASA schedule against PEFT's, and bad input."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.adamss import Linear as PeftAdamssLinear
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.adamss import AdamssAdapter, AdamssConfig
from peftkit.methods.adamss.asa import scheduled_target

from ..families import FAMILY, untouched
from ..parity import linearized
from ..parity import field_defaults


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(AdamssConfig) == field_defaults(peft.AdamssConfig)
    peft.AdamssConfig(r=7, num_subspaces=3, use_asa=True, init_warmup=2, final_warmup=9).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, AdamssConfig) and (loaded.r, loaded.num_subspaces, loaded.final_warmup) == (7, 3, 9)
    assert loaded.use_asa and loaded.init_weights == "orthogonal"
    AdamssConfig(subspace_rank=2, use_dynamic_rank=True, init_weights=False).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.AdamssConfig) and back.use_dynamic_rank and back.init_weights is None


@pytest.mark.parametrize("bad", [{"r": 0}, {"num_subspaces": 0}, {"subspace_rank": 1.5}, {"init_weights": "gaussian"},
                                 {"asa_importance_beta": 1.5}, {"svd_threshold": -0.1}, {"use_asa": "yes"},
                                 {"use_asa": True, "init_warmup": 10, "final_warmup": 10},
                                 {"use_asa": True, "mask_interval": 0}, {"use_asa": True, "asa_schedule_exponent": 0}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match=next(k for k in bad if k != "use_asa" or len(bad) == 1)):
        AdamssConfig(**bad)


def _peft_layer(base, **kw):
    return PeftAdamssLinear(copy.deepcopy(base), "default", r=kw["r"], config=peft.AdamssConfig(**kw))


@pytest.mark.parametrize("kw", [
    {"r": 6, "num_subspaces": 3, "subspace_rank": 2},
    {"r": 20, "num_subspaces": 4, "subspace_rank": 3, "init_weights": None, "bias": False},  # R clamps to 12
    {"r": 8, "num_subspaces": 3, "subspace_rank": 4, "use_dynamic_rank": True, "svd_threshold": 0.7, "random_seed": 5},
])
def test_svd_initialisation_equals_peft_layer(kw):
    kw = dict(kw)
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=kw.pop("bias", True))
    torch.manual_seed(7)
    ref = _peft_layer(base, **kw)
    torch.manual_seed(7)
    ours = AdamssAdapter(base, AdamssConfig(**kw))
    assert torch.equal(ours.adamss_newB, ref.adamss_newB["default"])
    assert torch.equal(ours.scatter_index, ref.scatter_index["default"])
    assert ours.num_subspaces == ref.num_subspaces["default"]
    for k in range(ours.num_subspaces):
        assert torch.equal(getattr(ours, f"adamss_A_{k}"), ref.adamss_A["default"][k]), k
        assert torch.equal(getattr(ours, f"adamss_B_{k}"), ref.adamss_B["default"][k]), k
    if kw.get("use_dynamic_rank"):
        assert len(set(ours.ranks)) > 1 and max(ours.ranks) < 4  # per subspace, below subspace_rank
    # the same update as PEFT's layer (B nudged off zero)
    with torch.no_grad():
        for k in range(ours.num_subspaces):
            noise = torch.randn_like(ref.adamss_B["default"][k])
            ref.adamss_B["default"][k].add_(noise)
            getattr(ours, f"adamss_B_{k}").add_(noise)
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(ours.forward(base, x, base(x)), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.fused_forward(base, x), ref(x), atol=1e-5, rtol=1e-5)


def test_update_matches_direct_formula_and_basis_is_orthonormal():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    ad = AdamssAdapter(base, AdamssConfig(r=6, num_subspaces=3, subspace_rank=2, init_weights=None))
    v_t = ad.adamss_newB  # (R, d_in + 1)
    assert v_t.shape == (6, 13)
    torch.testing.assert_close(v_t @ v_t.T, torch.eye(6), atol=1e-5, rtol=0)
    assert sorted(ad.scatter_index.tolist()) == list(range(20))  # the clusters partition the output channels
    x = torch.randn(2, 5, 12)
    x1 = torch.cat([x, torch.ones(2, 5, 1)], dim=-1)
    expected = base(x).detach().clone()
    for k, rows in enumerate(ad.clusters()):
        a, b = getattr(ad, f"adamss_A_{k}"), getattr(ad, f"adamss_B_{k}")
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)  # QR: orthonormal rows
        expected[..., rows] += (x1 @ (b @ a @ v_t).T).detach()
    with torch.no_grad():
        torch.testing.assert_close(ad.forward(base, x, base(x)), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ad.fused_forward(base, x), expected, atol=1e-5, rtol=1e-5)
        merged = x @ (base.weight + ad.delta_weight(base)).T + ad.merge_param(base, "bias", base.bias)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ad.unmerge_param(base, "bias", ad.merge_param(base, "bias", base.bias)), base.bias)


def test_conv1d_equals_the_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(18, 10)  # weight (10, 18): d_in 10, d_out 18
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    lin = nn.Linear(10, 18)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    cfg = AdamssConfig(r=5, num_subspaces=3, subspace_rank=2, init_weights=None)
    torch.manual_seed(1)
    ours = AdamssAdapter(conv, cfg)
    torch.manual_seed(1)
    ref = AdamssAdapter(lin, cfg)
    assert torch.equal(ours.adamss_newB, ref.adamss_newB) and torch.equal(ours.scatter_index, ref.scatter_index)
    torch.testing.assert_close(ours.delta_weight(conv), ref.delta_weight(lin).t())
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours.fused_forward(conv, x), ref.fused_forward(lin, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"r": 8, "num_subspaces": 3}, {"r": 100, "num_subspaces": 5}])
def test_param_count_closed_form(kw):
    model = FAMILY["llama"].model()
    cfg = AdamssConfig(**kw)
    ours = peftkit.get_peft_model(model, cfg)
    layers = ours.base_model.adapter_layers()
    closed = sum(AdamssAdapter.param_count(layer.base_layer, cfg, path) for path, layer in layers)
    assert ours.get_nb_trainable_parameters()[0] == closed
    # K R + d_out per layer (subspace_rank 1); Llama's q_proj is 32 x 32, v_proj 16 x 32 (R, K clamp to d_out)
    assert closed == sum(min(kw["num_subspaces"], d) * min(kw["r"], d) + d for d in (32, 16, 32, 16))


def test_param_count_with_small_clusters_is_the_bound():
    """subspace_rank > 1: each subspace trains min(|S_k|, r_k) (R + |S_k|); the closed form assumes |S_k| >= r_k."""
    cfg = AdamssConfig(r=8, num_subspaces=4, subspace_rank=2)
    ours = peftkit.get_peft_model(FAMILY["llama"].model(), cfg)
    adapters = [a for _, a in ours.base_model.adapters("default")]
    measured = ours.get_nb_trainable_parameters()[0]
    assert measured == sum(min(n, 2) * (8 + n) for a in adapters for n in a.sizes)
    assert any(n < 2 for a in adapters for n in a.sizes)  # Llama's tiny layers have a one-row cluster
    assert measured < sum(AdamssAdapter.param_count(layer.base_layer, cfg) for _, layer in ours.base_model.adapter_layers())


def test_small_layers_clamp_rank_and_subspaces_as_peft():
    torch.manual_seed(0)
    base = nn.Linear(6, 3, bias=False)  # R <= min(d_out, d_in) = 3, K <= d_out = 3
    torch.manual_seed(2)
    ref = _peft_layer(base, r=50, num_subspaces=5)
    torch.manual_seed(2)
    ours = AdamssAdapter(base, AdamssConfig(r=50, num_subspaces=5))
    assert ours.adamss_newB.shape == ref.adamss_newB["default"].shape == (3, 6)
    assert ours.num_subspaces == ref.num_subspaces["default"] == 3
    assert AdamssAdapter.param_count(base, AdamssConfig(r=50, num_subspaces=5)) == 3 * 3 + 3


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises((TypeError, ValueError), match="Conv2d"):
        peftkit.get_peft_model(model, AdamssConfig(r=2, target_modules=["0", "1"]))


def test_layer_without_enough_distinct_rows_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 8))
    with torch.no_grad():
        model[1].weight.copy_(torch.ones(8, 6))  # every output channel alike: one cluster, not 3
        model[1].bias.fill_(1.0)
    with untouched(model), pytest.raises(ValueError, match=r"1\.weight|1 \(num_subspaces\)"), pytest.warns(Warning):  # sklearn warns too
        peftkit.get_peft_model(model, AdamssConfig(r=1, num_subspaces=3, target_modules=["0", "1"]))


def test_loading_rebuilds_clusters_without_touching_the_rng(tmp_path):
    family = FAMILY["llama"]
    ours = peftkit.get_peft_model(family.model(), AdamssConfig(r=8, num_subspaces=3, subspace_rank=2,
                                                                init_weights=None, use_dynamic_rank=True))
    ours.save_pretrained(tmp_path)
    expected = family.run(ours)
    model = family.model()
    state = torch.get_rng_state()
    loaded = peftkit.PeftModel.from_pretrained(model, tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(family.run(loaded), expected, atol=1e-6, rtol=0)


def test_schedule_matches_formula():
    cfg = AdamssConfig(use_asa=True, asa_target_subspaces=4, init_warmup=10, final_warmup=20, asa_schedule_exponent=2)
    assert scheduled_target(9, cfg, 24) is None and scheduled_target(25, cfg, 24) == 4
    assert [scheduled_target(s, cfg, 24) for s in (10, 15, 20)] == [24, int(4 + 20 * 0.25), 4]


ASA = {"r": 8, "num_subspaces": 3, "use_asa": True, "init_warmup": 1, "final_warmup": 6, "mask_interval": 2}


def _masks_peft(model):
    return [[p.requires_grad for p in m.adamss_A["default"]] for m in model.modules()
            if isinstance(m, peft.tuners.adamss.AdamssLayer)]


def _masks_ours(model):
    return [[getattr(a, f"adamss_A_{k}").requires_grad for k in range(a.num_subspaces)]
            for _, a in model.base_model.adapters("default")]


@pytest.mark.parametrize(("name", "target"), [("llama", 4), ("gpt2", 2)])
def test_asa_prunes_as_peft(name, target):
    """A few seeded SGD steps with ``update_and_allocate`` in both libraries: the same subspaces stay trainable
    at every step, the same trainable count, and the same model (GPT-2: peft wraps its linearized copy)."""
    family = FAMILY[name]
    kw = {**ASA, "asa_target_subspaces": target}
    theirs = peft.get_peft_model(linearized(family.model()) if name == "gpt2" else family.model(), peft.AdamssConfig(**kw))
    ours = peftkit.get_peft_model(family.model(), AdamssConfig(**kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))  # the same start
    models = {"peft": theirs, "ours": ours}
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.3) for k, m in models.items()}
    counts = []
    for step in range(8):
        for lib, model in models.items():
            model.train()
            family.run(model).pow(2).mean().backward()
            opts[lib].step()
            (model.base_model if lib == "peft" else model).update_and_allocate(step)
            opts[lib].zero_grad()
        assert _masks_ours(ours) == _masks_peft(theirs), step
        counts.append(ours.get_nb_trainable_parameters()[0])
        assert counts[-1] == theirs.get_nb_trainable_parameters()[0]
    active = sum(map(sum, _masks_ours(ours)))
    assert active == target - 1  # strictly above the target-th score (PEFT's rule)
    assert counts[0] > counts[3] > counts[-1]  # pruned at steps 2 and 4
    torch.testing.assert_close(family.run(ours.eval()), family.run(theirs.eval()), atol=1e-4, rtol=1e-4)


def test_meta_model_counts_without_weights():
    """A model on the meta device (``peftkit.counts``) gets placeholder clusters with the closed-form count."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20, bias=False))
    cfg = AdamssConfig(r=16, num_subspaces=4, subspace_rank=2, target_modules=["0", "1"])
    ours = peftkit.get_peft_model(model, cfg)
    assert ours.get_nb_trainable_parameters()[0] == (4 * 2 * 16 + 2 * 30) + (4 * 2 * 16 + 2 * 20)
