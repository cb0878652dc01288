"""VeRA: the shared random projections, config validation, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.checkpoint import CheckpointError
from peftkit.config import ConfigError
from peftkit.methods.vera import VeraAdapter, VeraConfig, kaiming_uniform, vera_delta, vera_projections

from ..families import FAMILY
from ..parity import perturb

SHARED = {"base_model.vera_A", "base_model.vera_B"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns in both libraries
        yield


def keys(folder) -> set[str]:
    return set(load_file(folder / "adapter_model.safetensors"))


# -- config -----------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(VeraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.VeraConfig)}
    assert ours == theirs
    a, b = VeraConfig(), peft.VeraConfig()
    for name in theirs - {"peft_type", "peft_version"}:
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "VERA" and (a.r, a.projection_prng_key, a.save_projection, a.d_initial) == (256, 0, True, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [({"r": 0}, "r", "> 0"), ({"r": -3}, "r", "> 0"), ({"r": 2.5}, "r", "integer"),
     ({"projection_prng_key": None}, "projection_prng_key", "integer"),
     ({"save_projection": "yes"}, "save_projection", "True or False"),
     ({"vera_dropout": 1.0}, "vera_dropout", r"\[0, 1\)"), ({"vera_dropout": -0.1}, "vera_dropout", r"\[0, 1\)"),
     ({"d_initial": "small"}, "d_initial", "number"), ({"bias": "lora_only"}, "bias", "vera_only"),
     ({"init_weights": "zeros"}, "init_weights", "True or False"),
     ({"layers_pattern": "layers"}, "layers_pattern", "layers_to_transform")],
)
def test_config_validation_names_the_field_and_constraint(kwargs, field, expected):
    with pytest.raises(ConfigError, match=rf"VeraConfig\.{field}: .*{expected}"):
        VeraConfig(**kwargs)


def test_config_json_round_trip_and_peft_reads_it(tmp_path):
    cfg = VeraConfig(r=16, projection_prng_key=5, save_projection=False, d_initial=0.2, target_modules=["q_proj"])
    cfg.save_pretrained(tmp_path)
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, VeraConfig) and back.to_dict() == cfg.to_dict()
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.VeraConfig)
    assert (ref.r, ref.projection_prng_key, ref.save_projection, ref.d_initial) == (16, 5, False, 0.2)


# -- pure functions ---------------------------------------------------------------------------------------
def test_projections_are_peft_bit_for_bit():
    from peft.tuners.vera.model import _kaiming_init

    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(kaiming_uniform((5, 37), g1), _kaiming_init((5, 37), generator=g2))
    a, b = vera_projections(6, 37, 40, seed=3)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a, _kaiming_init((6, 37), generator=g)) and torch.equal(b, _kaiming_init((40, 6), generator=g))
    # Kaiming uniform: |A| <= sqrt(6 / d_in), |B| <= sqrt(6 / r)
    assert a.abs().max() <= (6 / 37) ** 0.5 and b.abs().max() <= (6 / 6) ** 0.5
    assert not torch.equal(vera_projections(6, 37, 40, seed=4)[0], a)


def test_delta_is_diag_b_B_diag_d_A():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    lb, ld = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vera_delta(lb, ld, a, b), torch.diag(lb) @ b @ torch.diag(ld) @ a)
    assert torch.linalg.matrix_rank(vera_delta(lb, ld, a, b)) == 3


def test_layers_use_slices_of_one_shared_pair():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), VeraConfig(r=4, target_modules=["v_proj", "down_proj"]))
    shared = model.base_model.shared_state["default"]
    assert shared.vera_A.shape == (4, 37) and shared.vera_B.shape == (32, 4)  # max d_in 37, max d_out 32
    a, b = vera_projections(4, 37, 32, seed=0)
    assert torch.equal(shared.vera_A, a) and torch.equal(shared.vera_B, b)
    adapters = [layer.adapters["default"] for _, layer in model.base_model.adapter_layers()]
    assert all(ad.shared is shared for ad in adapters)  # one copy, referenced by every layer
    # not a buffer of any layer: the model's state dict holds the projections once
    state = model.state_dict()
    assert [k for k in state if k.endswith("vera_A")] == ["base_model.shared_state.default.vera_A"]
    assert not any(p.requires_grad for p in shared.buffers())
    v = next(ad for ad in adapters if ad.d_out == 16)  # v_proj: 32 -> 16
    torch.testing.assert_close(v._projections(v.vera_lambda_d)[1], b[:16])


def test_standalone_adapter_forward_matches_its_delta():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for base in (nn.Linear(6, 5), Conv1D(5, 6)):
        adapter = VeraAdapter(base, VeraConfig(r=3, init_weights=False))
        assert adapter.vera_lambda_b.shape == (5,) and adapter.vera_lambda_d.shape == (3,)
        x = torch.randn(4, 6)
        delta = adapter.delta_weight(base)
        assert delta.shape == base.weight.shape
        merged = x @ (base.weight + delta) + base.bias if isinstance(base, Conv1D) else x @ (base.weight + delta).t() + base.bias
        torch.testing.assert_close(adapter(base, x, base(x)), merged, atol=1e-6, rtol=1e-6)


def test_init_and_dropout():
    base = nn.Linear(8, 6)
    adapter = VeraAdapter(base, VeraConfig(r=4, d_initial=0.3, vera_dropout=0.5))
    assert torch.equal(adapter.vera_lambda_b, torch.zeros(6)) and torch.equal(adapter.vera_lambda_d, torch.full((4,), 0.3))
    with torch.no_grad():
        adapter.vera_lambda_b.fill_(1.0)
    x, zero = torch.randn(3, 8), torch.zeros(3, 6)
    adapter.eval()
    torch.testing.assert_close(adapter(base, x, zero), x @ adapter.delta_weight(base).t())
    adapter.train()
    assert not torch.allclose(adapter(base, x, zero), x @ adapter.delta_weight(base).t())


# -- compatibility with Hugging Face PEFT ------------------------------------------------------------------


# -- the projections in files ------------------------------------------------------------------------------
def _trained(family, **kwargs):
    model = peftkit.get_peft_model(family.model(), VeraConfig(r=8, **kwargs))
    perturb(model, only="vera_lambda")
    return model


def test_without_saved_projections_they_are_regenerated_from_the_seed(tmp_path):
    family = FAMILY["llama"]
    model = _trained(family, save_projection=False, projection_prng_key=9)
    model.save_pretrained(tmp_path)
    assert not SHARED & keys(tmp_path)
    expected = family.run(model)
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)
    # the seed is what brings them back: another seed gives other projections, other outputs
    other = peftkit.PeftModel.from_pretrained(family.model(), tmp_path, config=VeraConfig(
        r=8, save_projection=False, projection_prng_key=10))
    assert not torch.allclose(family.run(other), expected)


def test_saved_projections_are_used_when_present(tmp_path):
    family = FAMILY["llama"]
    model = _trained(family)
    with torch.no_grad():  # projections that the seed cannot reproduce: only the file knows them
        model.base_model.shared_state["default"].vera_A.mul_(-2.0)
    model.save_pretrained(tmp_path)
    assert SHARED <= keys(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), family.run(model), atol=0, rtol=0)
    torch.testing.assert_close(family.run(peft.PeftModel.from_pretrained(family.model(), tmp_path)),
                               family.run(model), atol=1e-5, rtol=0)


def test_projections_absent_from_a_file_that_should_hold_them_are_regenerated_with_a_warning(tmp_path):
    family = FAMILY["llama"]
    model = _trained(family)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if k not in SHARED}, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="vera_A"):
        loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), family.run(model), atol=0, rtol=0)


def test_projection_shape_is_checked_and_the_model_left_untouched(tmp_path):
    family = FAMILY["llama"]
    _trained(family).save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.vera_A"] = torch.zeros(8, 31)
    save_file(state, tmp_path / "adapter_model.safetensors")
    base = family.model()
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'base_model.vera_A': checkpoint \(8, 31\), model \(8, 32\)"):
        peftkit.PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in base.modules())


# -- several adapters ---------------------------------------------------------------------------------------
def test_a_second_adapter_reuses_the_first_ones_projections_like_peft():
    family = FAMILY["llama"]
    ours = peftkit.get_peft_model(family.model(), VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    theirs = peft.get_peft_model(family.model(), peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    ours.add_adapter("two", VeraConfig(r=8, target_modules=["v_proj"], init_weights=False))
    torch.manual_seed(0)
    theirs.add_adapter("two", peft.VeraConfig(r=8, target_modules=["v_proj"]))
    first, second = (ours.base_model.shared_state[n] for n in ("default", "two"))
    assert torch.equal(first.vera_A, second.vera_A) and second.vera_A.shape == (8, 37)
    assert first.vera_A.data_ptr() != second.vera_A.data_ptr()  # a private copy: loading "two" cannot change "default"
    assert torch.equal(second.vera_A, theirs.base_model.vera_A["two"])
    ours.set_adapter("two")
    theirs.set_adapter("two")
    with torch.no_grad():
        for n, layer in ours.base_model.adapter_layers():
            if "two" in layer.adapters:
                ref = theirs.base_model.model.get_submodule(n)
                layer.adapters["two"].vera_lambda_b.copy_(torch.randn(ref.vera_lambda_b["two"].shape))
                ref.vera_lambda_b["two"].copy_(layer.adapters["two"].vera_lambda_b)
                ref.vera_lambda_d["two"].copy_(layer.adapters["two"].vera_lambda_d)
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-6, rtol=0)
    ours.delete_adapter("two")
    assert list(ours.base_model.shared_state) == ["default"]


@pytest.mark.parametrize(
    ("kwargs", "match", "peft_rejects"),
    [({"projection_prng_key": 1}, r"VeraConfig\.projection_prng_key: 1 differs from adapter 'default'", True),
     ({"save_projection": False}, r"VeraConfig\.save_projection: False differs", True),
     ({"r": 16}, r"VeraConfig\.r: 16 differs from the rank 8", True),
     ({"r": 4}, r"VeraConfig\.r: 4 differs from the rank 8", False),  # peft accepts it, then fails in forward
     ({"target_modules": ["down_proj"]}, r"down_proj: a 32 x 37 layer does not fit .*vera_A \(8, 32\)", True)],
)
def test_incompatible_second_adapter_is_rejected_and_changes_nothing(kwargs, match, peft_rejects):
    family = FAMILY["llama"]
    kw = {"r": 8, "target_modules": ["q_proj", "v_proj"], **kwargs}
    model = peftkit.get_peft_model(family.model(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    layers = [n for n, _ in model.base_model.adapter_layers()]
    with pytest.raises(ValueError, match=match):
        model.add_adapter("two", VeraConfig(**kw))
    assert list(model.peft_config) == ["default"] and list(model.base_model.shared_state) == ["default"]
    assert [n for n, _ in model.base_model.adapter_layers()] == layers
    assert all(list(layer.adapters) == ["default"] for _, layer in model.base_model.adapter_layers())
    if peft_rejects:
        theirs = peft.get_peft_model(family.model(), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        with pytest.raises(ValueError):
            theirs.add_adapter("two", peft.VeraConfig(**kw))


def test_inject_adapter_in_model_refuses_shared_state_like_peft():
    with pytest.raises(ValueError, match="get_peft_model"):
        peftkit.inject_adapter_in_model(VeraConfig(r=4), FAMILY["llama"].model())
    with pytest.raises(ValueError, match="get_peft_model"):
        peft.inject_adapter_in_model(peft.VeraConfig(r=4), FAMILY["llama"].model())


def test_unload_and_delete_drop_the_shared_state():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), VeraConfig(r=4))
    model.add_adapter("two", VeraConfig(r=4))
    model.delete_adapter("default")
    assert list(model.base_model.shared_state) == ["two"]
    model.unload()
    assert not len(model.base_model.shared_state)
