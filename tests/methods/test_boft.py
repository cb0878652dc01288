"""BOFT: butterfly permutations and factors, config validation, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from peft.tuners.boft.layer import BOFTLayer
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.oft import BOFTAdapter, BOFTConfig
from peftkit.methods.oft import functional as OF
from peftkit.methods.oft.kernels import RotatedLinear

from ..families import FAMILY
from ..parity import train_a_little


def peft_dense_rotation(blocks: torch.Tensor, width: int) -> torch.Tensor:
    """PEFT's construction with its own helpers: prod_i P_i block_diag(R_i) P_i^T as dense matrices."""
    m, d, b, _ = blocks.shape
    perms = [BOFTLayer.block_butterfly_perm(None, width, int(d / 2**i), int(b / 2), m - 1) for i in range(m)]
    p = torch.stack([BOFTLayer.perm2mat(None, perm) for perm in perms]).to(blocks.dtype)
    mats = torch.bmm(p, torch.bmm(torch.stack([torch.block_diag(*blocks[i]) for i in range(m)]), p.transpose(1, 2)))
    out = mats[0]
    for i in range(1, m):
        out = mats[i] @ out
    return out


# -- config ---------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(BOFTConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.BOFTConfig)}
    assert ours == theirs
    a, b = BOFTConfig(), peft.BOFTConfig()
    for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "fan_in_fan_out",
                 "bias", "init_weights", "target_modules", "exclude_modules", "modules_to_save"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "BOFT" and (a.boft_block_size, a.boft_n_butterfly_factor) == (4, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"boft_block_size": 0}, "boft_block_size / boft_block_num"),
     ({"boft_block_num": 4}, "boft_block_size / boft_block_num"),
     ({"boft_block_size": -4}, "boft_block_size"), ({"boft_block_size": 0, "boft_block_num": 1.5}, "boft_block_num"),
     ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
     ({"boft_block_size": 3, "boft_n_butterfly_factor": 2}, "boft_block_size"),
     ({"boft_block_size": 0, "boft_block_num": 6, "boft_n_butterfly_factor": 3}, "boft_block_num"),
     ({"boft_dropout": 1.0}, "boft_dropout"), ({"bias": "oft_only"}, "bias"), ({"init_weights": "x"}, "init_weights"),
     ({"layers_pattern": "layers"}, "layers_pattern")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"BOFTConfig\.{field}"):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"boft_block_size": 5}, r"q_proj: BOFTConfig\.boft_block_size=5 must divide the layer's input width "
                              r"\(in_features = 32\)"),
     ({"boft_block_size": 0, "boft_block_num": 3}, r"q_proj: BOFTConfig\.boft_block_num=3 must divide"),
     ({"boft_block_size": 16, "boft_n_butterfly_factor": 3}, r"q_proj: .*boft_block_size=16 times "
                                                             r"2\^\(boft_n_butterfly_factor - 1\) = 64"),
     ({"boft_block_size": 0, "boft_block_num": 32, "boft_n_butterfly_factor": 2},
      r"q_proj: BOFT butterflies need an even block size and block count, got 32 blocks of size 1")],
)
def test_block_layout_must_fit_the_layer(kwargs, message):
    model = FAMILY["llama"].model()
    with pytest.raises(ValueError, match=message):
        peftkit.get_peft_model(model, BOFTConfig(target_modules=["q_proj"], **kwargs))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules()), "model left modified"


# -- pure functions -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "d", "b", "m"), [(32, 8, 4, 2), (32, 8, 4, 3), (64, 4, 16, 3), (48, 12, 4, 3),
                                                (16, 4, 4, 1), (24, 12, 2, 2)])
def test_butterfly_permutations_and_rotation_equal_peft(n, d, b, m):
    for i in range(m):
        expected = BOFTLayer.block_butterfly_perm(None, n, int(d / 2**i), int(b / 2), m - 1)
        assert torch.equal(OF.butterfly_permutation(n, d // 2**i, b // 2, m - 1), expected)
    blocks = OF.cayley_full(torch.randn(m * d, b, b, dtype=torch.float64)).view(m, d, b, b)
    perms = OF.butterfly_permutations(n, d, b, m)
    assert perms[0] is None  # the first factor is plain block-diagonal
    dense = peft_dense_rotation(blocks, n)
    torch.testing.assert_close(OF.dense_rotation(blocks, perms, n), dense)
    torch.testing.assert_close(dense @ dense.t(), torch.eye(n, dtype=torch.float64))
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(OF.butterfly_apply(x, blocks, perms, transpose=True), x @ dense.t())


def test_butterflies_mix_every_input_after_log2_blocks_factors():
    blocks = OF.cayley_full(torch.randn(3 * 8, 4, 4, dtype=torch.float64)).view(3, 8, 4, 4)
    dense = OF.dense_rotation(blocks, OF.butterfly_permutations(32, 8, 4, 3), 32)
    # one factor couples 4 coordinates; each further factor doubles the span: 3 factors reach 16
    assert (dense.abs() > 1e-12).sum(1).min() == 16


def test_cayley_full_uses_the_skew_part_like_peft():
    a = torch.randn(6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(OF.cayley_full(a), BOFTLayer.cayley_batch(None, a))


def test_rotated_linear_kernel_gradients_with_butterflies():
    g = torch.Generator().manual_seed(2)
    n, d, b, m = 16, 4, 4, 3
    x = torch.randn(5, n, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, n, generator=g, dtype=torch.float64, requires_grad=True)
    blocks = torch.randn(m, d, b, b, generator=g, dtype=torch.float64, requires_grad=True)
    perms = OF.butterfly_permutations(n, d, b, m)
    torch.autograd.gradcheck(lambda *t: RotatedLinear.apply(*t, perms), (x, w, None, blocks))
    dense = OF.dense_rotation(blocks, perms, n)
    torch.testing.assert_close(RotatedLinear.apply(x, w, None, blocks, perms), x @ dense @ w.t())


# -- adapter ----------------------------------------------------------------------------------------------
def test_identity_at_init_and_random_with_init_false():
    base = nn.Linear(16, 5)
    x = torch.randn(3, 16)
    a = BOFTAdapter(base, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2))
    assert a.boft_R.shape == (2, 4, 4, 4) and a.boft_s.shape == (5, 1)
    assert torch.count_nonzero(a.boft_R) == 0 and torch.equal(a.boft_s, torch.ones(5, 1))
    assert torch.equal(a.fused_forward(base, x), base(x))
    b = BOFTAdapter(base, BOFTConfig(boft_block_size=4, init_weights=False))
    assert 0.05 < b.boft_R.std() < 0.2 and 0.8 < b.boft_s.mean() < 1.2
    conv = BOFTAdapter(nn.Conv2d(3, 6, 3), BOFTConfig(boft_block_size=9))
    assert conv.boft_R.shape == (1, 3, 9, 9) and conv.boft_s.shape == (1, 6)


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_forward_paths_merge_and_unmerge_agree_with_the_dense_rotation(factors):
    torch.manual_seed(0)
    base = nn.Linear(32, 6)
    a = BOFTAdapter(base, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False)).eval()
    x = torch.randn(4, 32)
    dense = peft_dense_rotation(a._blocks().detach(), 32)
    s = a.boft_s.detach().view(-1)
    expected = (x @ dense @ base.weight.detach().t()) * s + base.bias.detach()
    torch.testing.assert_close(a.fused_forward(base, x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(a(base, x, base(x)), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(a.fused_forward(base, x), expected, atol=1e-5, rtol=0)
    merged, state = a.merge(base, base.weight.detach())
    torch.testing.assert_close(merged, (base.weight.detach() @ dense.t()) * s[:, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.unmerge(base, merged, state), base.weight.detach(), atol=1e-6, rtol=0)


def test_boft_dropout_sets_blocks_of_one_factor_to_identity_in_training_only():
    torch.manual_seed(0)
    a = BOFTAdapter(nn.Linear(32, 8), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                 boft_dropout=0.5, init_weights=False)).eval()
    full = a._blocks()
    a.train()
    eye = torch.eye(4)
    for _ in range(5):
        blocks = a._blocks()
        dropped = torch.tensor([[torch.equal(blocks[i, k], eye) for k in range(8)] for i in range(2)])
        assert dropped.sum() == 4 and dropped.any(1).sum() == 1  # int(0.5 * 8) blocks of a single factor
        assert torch.equal(blocks[~dropped], full[~dropped])
    a.eval()
    assert torch.equal(a._blocks(), full)


def test_butterfly_model_trains_saves_and_reloads(tmp_path):
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=4))
    train_a_little(model, family, lr=2.0)
    expected = family.run(model)
    assert (expected - family.run(family.model())).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)
    torch.testing.assert_close(family.run(loaded.merge_and_unload()), expected, atol=1e-5, rtol=0)


# -- compatibility with Hugging Face PEFT ------------------------------------------------------------------


