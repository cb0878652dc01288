"""RandLoRA beyond the parity table: config fields as peft's, one seed per model, bases rebuilt on load."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch

import peftkit
from peftkit import ConfigError

from ..families import FAMILY


def test_fields_and_defaults_are_peft_s():
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.RandLoraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.RandLoraConfig)}
    assert {k: v for k, v in theirs.items() if k in ours} == {k: ours[k] for k in theirs if k in ours}
    assert set(theirs) - set(ours) <= {"runtime_config"}


def test_adapters_share_one_seed():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.RandLoraConfig(r=4))
    with pytest.raises(ConfigError, match="projection_prng_key"):
        model.add_adapter("other", peftkit.RandLoraConfig(r=4, projection_prng_key=1))
    assert list(model.peft_config) == ["default"]


def test_full_rank_update_with_few_parameters():
    """N = ceil(m / r) bases: the update reaches full rank min(d_in, d_out) (the paper's point)."""
    model = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.RandLoraConfig(r=3, init_weights=False))
    layer = dict(model.base_model.adapter_layers())["model.layers.0.self_attn.q_proj"]
    adapter = layer.adapters["default"]
    assert adapter.randlora_lambda.shape == (3, 11) and adapter.randlora_gamma.shape == (11, 32)
    assert torch.linalg.matrix_rank(adapter.delta_weight(layer.base_layer)) == 3  # gamma constant: rank r
    with torch.no_grad():
        adapter.randlora_gamma.copy_(torch.randn(11, 32))  # diagonals that differ per basis: full rank
    assert torch.linalg.matrix_rank(adapter.delta_weight(layer.base_layer)) == 32


def test_file_without_bases_rebuilds_them(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peftkit.RandLoraConfig(r=4, save_projection=False, init_weights=False, projection_prng_key=9)
        model = peftkit.get_peft_model(FAMILY["gpt2"].model(), cfg)
        model.save_pretrained(tmp_path)
        loaded = peftkit.PeftModel.from_pretrained(FAMILY["gpt2"].model(), tmp_path)
    torch.testing.assert_close(FAMILY["gpt2"].run(loaded), FAMILY["gpt2"].run(model), atol=0, rtol=0)


def test_scaled_basis_gradients_are_exact_and_keep_no_full_size_intermediate():
    from peftkit.methods.randlora import functional as RF

    g = torch.Generator().manual_seed(0)
    lam, a, gamma = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                     for s in ((3, 4), (3, 5), (4, 5)))
    assert torch.autograd.gradcheck(RF.ScaledBasis.apply, (lam, a, gamma))
    torch.testing.assert_close(RF.ScaledBasis.apply(lam, a, gamma), lam[:, :, None] * a[:, None, :] * gamma[None])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        RF.ScaledBasis.apply(lam, a, gamma)
    assert sorted(saved) == [(3, 4), (3, 5), (4, 5)]  # lam, A, gamma: no (r, N, m) product
