"""OFT / COFT: the Cayley and block math, config validation, and compatibility with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from peft.tuners.oft.layer import OFTRotationModule
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.oft import OFTAdapter, OFTConfig
from peftkit.methods.oft import functional as OF
from peftkit.methods.oft.kernels import RotatedLinear

from ..families import FAMILY
from ..parity import assert_merges_like_peft, paired_configs


def configs(name: str, **kwargs):
    return paired_configs(FAMILY[name], peft.OFTConfig, OFTConfig, **kwargs)


# -- config ---------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(OFTConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.OFTConfig)}
    assert ours == theirs
    a, b = OFTConfig(), peft.OFTConfig()
    for name in ("r", "oft_block_size", "module_dropout", "fan_in_fan_out", "bias", "init_weights", "coft", "eps",
                 "block_share", "use_cayley_neumann", "num_cayley_neumann_terms", "target_modules",
                 "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "OFT" and (a.r, a.oft_block_size, a.eps) == (0, 32, 6e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"r": 0, "oft_block_size": 0}, "r / oft_block_size"), ({"r": 4, "oft_block_size": 8}, "r / oft_block_size"),
     ({"r": -1, "oft_block_size": 0}, "r"), ({"oft_block_size": 2.5}, "oft_block_size"),
     ({"oft_block_size": 1}, "oft_block_size"), ({"module_dropout": 1.0}, "module_dropout"),
     ({"bias": "lora_only"}, "bias"), ({"eps": 0}, "eps"), ({"coft": "yes"}, "coft"),
     ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"), ({"block_share": 1}, "block_share"),
     ({"layers_pattern": "layers"}, "layers_pattern"),
     ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"OFTConfig\.{field}"):
        OFTConfig(**kwargs)


def test_config_json_round_trip_and_peft_reads_it(tmp_path):
    cfg = OFTConfig(oft_block_size=8, coft=True, eps=1e-3, block_share=True, target_modules=["q_proj"])
    cfg.save_pretrained(tmp_path)
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, OFTConfig) and back.to_dict() == cfg.to_dict()
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.OFTConfig) and (ref.oft_block_size, ref.coft, ref.block_share) == (8, True, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"oft_block_size": 5}, r"q_proj: OFTConfig\.oft_block_size=5 must divide the layer's input width "
                             r"\(in_features = 32\)"),
     ({"r": 3, "oft_block_size": 0}, r"q_proj: OFTConfig\.r=3 .* input width \(in_features = 32\)"),
     ({"r": 32, "oft_block_size": 0}, r"q_proj: OFTConfig\.r=32 leaves blocks of size 1")],
)
def test_block_size_must_fit_the_layer(kwargs, message):
    model = FAMILY["llama"].model()
    with pytest.raises(ValueError, match=message):
        peftkit.get_peft_model(model, OFTConfig(target_modules=["q_proj"], **kwargs))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules()), "model left modified"


def test_conv_width_is_the_flattened_kernel():
    with pytest.raises(ValueError, match=r"conv1: .*oft_block_size=4 .*c_in \* k_h \* k_w = 3 \* 3 \* 3 = 27"):
        peftkit.get_peft_model(FAMILY["convnet"].model(), OFTConfig(oft_block_size=4, target_modules=["conv1"]))


# -- pure functions -------------------------------------------------------------------------------------
def reference_module(block_size: int, blocks: int, **kwargs) -> OFTRotationModule:
    return OFTRotationModule(blocks, block_size * (block_size - 1) // 2, block_size, blocks * block_size, **kwargs)


def test_skew_symmetric_layout_matches_peft_and_round_trips():
    ref = reference_module(5, 3)
    vec = torch.randn(3, 10)
    q = OF.skew_symmetric(vec, 5)
    assert torch.equal(q, ref._pytorch_skew_symmetric(vec, 5))
    assert torch.equal(q, -q.transpose(1, 2)) and torch.equal(OF.skew_entries(q), vec)


@pytest.mark.parametrize("terms", [None, 1, 2, 3, 4, 5, 6, 8])
def test_cayley_matches_peft(terms):
    ref = reference_module(6, 4)
    q = OF.skew_symmetric(0.3 * torch.randn(4, 15, dtype=torch.float64), 6)
    expected = ref._cayley_batch(OF.skew_entries(q), 6, terms is not None, terms or 5)
    torch.testing.assert_close(OF.cayley(q, terms), expected, atol=1e-12, rtol=0)


def test_exact_cayley_is_orthogonal_and_neumann_approaches_it():
    q = OF.skew_symmetric(0.05 * torch.randn(3, 28, dtype=torch.float64), 8)
    exact = OF.cayley(q)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), torch.eye(8, dtype=torch.float64).expand(3, 8, 8))
    # Neumann: (I + Q)(I - Q)^-1 = I + 2Q + 2Q^2 + ..., the transpose of the exact (I - Q)(I + Q)^-1
    errors = [(OF.cayley(q, t) - exact.transpose(1, 2)).abs().max() for t in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4
    assert OF.orthogonality_defect(exact) < 1e-12 < OF.orthogonality_defect(OF.cayley(q, 3))


@pytest.mark.parametrize("terms", [4, 5, 8])
def test_neumann_series_keeps_q_and_one_product_per_level(terms):
    """Autograd keeps Q and the t - 2 Horner products (t = max(3, terms - 1)); no (2I + Q) tensor."""
    vec = torch.randn(3, 28, dtype=torch.float64, requires_grad=True)
    q = OF.skew_symmetric(vec, 8)
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        OF.cayley(q, terms)
    assert len(kept) == 1 + max(3, terms - 1) - 2


def test_coft_projection_matches_peft():
    ref = reference_module(4, 5, coft=True)
    vec = torch.randn(5, 6) * torch.tensor([1e-6, 1e-3, 1e-1, 1.0, 0.0])[:, None]
    eps = 1e-3
    torch.testing.assert_close(OF.coft_project(vec, eps), ref._project_batch(vec, eps=eps), atol=1e-9, rtol=1e-6)
    out = OF.coft_project(vec, eps)
    radius = eps / 5**0.5
    assert (OF.skew_symmetric(out, 4).flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()
    assert torch.equal(OF.coft_project(out, eps), out)  # idempotent


@pytest.mark.parametrize(("blocks", "size"), [(12, 32), (96, 4), (6, 2), (5, 3), (1, 8)])
def test_block_apply_and_outer_are_the_block_diagonal_product_and_its_gradient(blocks, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, blocks * size, generator=g, dtype=torch.float64)
    r = torch.randn(blocks, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    dense = torch.block_diag(*r)
    torch.testing.assert_close(OF.block_apply(x, r), x @ dense)
    torch.testing.assert_close(OF.block_apply(x, r, transpose=True), x @ dense.t())
    grad = torch.randn(7, blocks * size, generator=g, dtype=torch.float64)
    (x @ torch.block_diag(*r)).backward(grad)
    torch.testing.assert_close(OF.block_outer(x, grad, blocks, size), r.grad)


def test_shared_block_applies_one_block_everywhere():
    x, r = torch.randn(3, 12, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(OF.block_apply(x, r), x @ torch.block_diag(r[0], r[0], r[0]))


@pytest.mark.parametrize("rotate_input", [None, True, False])  # None: the smaller side (here the input)
@pytest.mark.parametrize("shared", [False, True])
def test_rotated_linear_kernel_gradients(shared, rotate_input):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    blocks = torch.randn(1, 1 if shared else 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: RotatedLinear.apply(*t, [None], rotate_input), (x, w, bias, blocks))
    r = torch.block_diag(*([blocks[0, 0]] * 3 if shared else blocks[0]))
    torch.testing.assert_close(RotatedLinear.apply(x, w, bias, blocks, [None], rotate_input), x @ r @ w.t() + bias)


def _bmm_shapes(fn) -> list[tuple[int, ...]]:
    """The first operand's shape of every batched matmul the ops under ``fn`` run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.bmm.out):
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return shapes


@pytest.mark.parametrize(("rows", "d_out", "rotated"), [(96, 40, "weight"), (80, 200, "input"), (8, 200, "weight")])
def test_training_rotates_the_side_with_fewer_rows(rows, d_out, rotated):
    """The forward rotates W (d_out rows) or x (token rows), whichever is smaller; with autograd on and
    fewer than MIN_INPUT_ROWS tokens, W (the merged layer's rounding). Either way the same values."""
    from peftkit.methods.oft.layer import MIN_INPUT_ROWS

    assert 8 < MIN_INPUT_ROWS <= 80
    torch.manual_seed(0)
    base = nn.Linear(32, d_out).double()
    a = OFTAdapter(base, OFTConfig(oft_block_size=16, init_weights=False)).double().train()
    x = torch.randn(rows, 32, dtype=torch.float64, requires_grad=True)
    # one block-diagonal product over 2 blocks of 16 (the Cayley series runs as baddbmm)
    assert _bmm_shapes(lambda: a.fused_forward(base, x)) == [(2, d_out if rotated == "weight" else rows, 16)]
    out = a.fused_forward(base, x)
    dense = torch.block_diag(*a._blocks()[0])
    torch.testing.assert_close(out, x @ dense @ base.weight.t() + base.bias)
    g = torch.randn_like(out)
    (grad_x, grad_r), (ref_x, ref_r) = (
        torch.autograd.grad(y, (x, a.oft_R), g)
        for y in (out, x @ torch.block_diag(*a._blocks()[0]) @ base.weight.t() + base.bias))
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(grad_r, ref_r)


def test_eval_without_autograd_reuses_the_rotation_until_the_parameters_change():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    a = OFTAdapter(base, OFTConfig(oft_block_size=4, init_weights=False)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = a._forward_blocks()
        assert a._forward_blocks() is first  # kept
        out = a.fused_forward(base, x)
        a.oft_R.mul_(0.5)  # an in-place update (optimizer step, load) recomputes
        assert a._forward_blocks() is not first
        torch.testing.assert_close(a._forward_blocks(), a._blocks())
        assert not torch.allclose(a.fused_forward(base, x), out)
    assert a._forward_blocks().requires_grad  # autograd on, trainable: the graph, never the kept copy
    a.train()
    with torch.no_grad():
        assert a._forward_blocks() is not a._forward_blocks()  # training: recomputed on every call


# -- adapter ----------------------------------------------------------------------------------------------
def test_identity_at_init_and_random_with_init_false():
    base = nn.Linear(16, 5)
    x = torch.randn(3, 16)
    a = OFTAdapter(base, OFTConfig(oft_block_size=4))
    assert a.oft_R.shape == (4, 6) and torch.count_nonzero(a.oft_R) == 0
    assert torch.equal(a.fused_forward(base, x), base(x))
    b = OFTAdapter(base, OFTConfig(oft_block_size=4, init_weights=False))
    assert 0.05 < b.oft_R.std() < 0.2


@pytest.mark.parametrize("neumann", [True, False])
def test_unmerge_inverts_merge_and_all_forward_paths_agree(neumann):
    torch.manual_seed(0)
    base = nn.Linear(16, 6)
    a = OFTAdapter(base, OFTConfig(oft_block_size=8, init_weights=False, use_cayley_neumann=neumann)).eval()
    x = torch.randn(4, 16)
    merged, state = a.merge(base, base.weight.detach())
    assert state is None  # close enough to orthogonal: undone by the inverse, no copy kept
    torch.testing.assert_close(a.unmerge(base, merged, state), base.weight.detach(), atol=1e-6, rtol=0)
    expected = nn.functional.linear(x, merged, base.bias)
    torch.testing.assert_close(a.fused_forward(base, x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(a(base, x, base(x)), expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # inference on few tokens rotates the input instead of the weight
        torch.testing.assert_close(a.fused_forward(base, x), expected, atol=1e-6, rtol=0)


def test_far_from_orthogonal_neumann_blocks_keep_the_original_for_unmerge():
    base = nn.Linear(16, 6)
    a = OFTAdapter(base, OFTConfig(oft_block_size=16))
    with torch.no_grad():
        a.oft_R.fill_(0.5)  # ||Q|| > 1: the Neumann series is no rotation at all
    merged, state = a.merge(base, base.weight.detach().clone())
    assert torch.equal(a.unmerge(base, merged, state), base.weight)


def test_coft_projects_the_parameter_in_training_and_on_the_fly_in_eval():
    base = nn.Linear(8, 8)
    a = OFTAdapter(base, OFTConfig(oft_block_size=4, coft=True, eps=1e-2))
    with torch.no_grad():
        a.oft_R.fill_(1.0)
    x = torch.randn(2, 8)
    raw = a.oft_R.detach().clone()
    out_eval = a.eval().fused_forward(base, x)
    assert torch.equal(a.oft_R, raw)  # eval: nothing changes
    out_train = a.train().fused_forward(base, x)
    assert torch.equal(a.oft_R, OF.coft_project(raw, 1e-2))  # training: projected in place
    torch.testing.assert_close(out_train, out_eval, atol=0, rtol=0)
    radius = 1e-2 / 2**0.5
    assert torch.allclose(OF.skew_symmetric(a.oft_R, 4).flatten(1).norm(dim=1), torch.tensor(radius))


def test_module_dropout_sets_blocks_to_identity_in_training_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16, bias=False)
    a = OFTAdapter(base, OFTConfig(oft_block_size=4, module_dropout=0.5, init_weights=False)).eval()
    full = a._blocks()
    identity = torch.eye(4).expand(4, 4, 4)
    a.train()
    for _ in range(5):
        blocks = a._blocks()[0]
        dropped = [torch.equal(blocks[k], identity[k]) for k in range(4)]
        assert sum(dropped) == 2
        assert all(torch.equal(blocks[k], full[0, k]) for k in range(4) if not dropped[k])
    a.eval()
    assert torch.equal(a._blocks(), full)


def test_embedding_rotates_the_output_vectors_like_peft(tmp_path):
    family = FAMILY["llama"]
    kw = {"oft_block_size": 8, "target_modules": ["embed_tokens"], "init_weights": False}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(family.model(), peft.OFTConfig(**kw))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    assert "base_model.model.model.embed_tokens.oft_embedding_R.weight" in peftkit.get_peft_model_state_dict(ours)
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    assert_merges_like_peft(family, theirs, ours)


# -- compatibility with Hugging Face PEFT ------------------------------------------------------------------
def test_peft_cannot_wrap_gpt2_conv1d_but_peftkit_can():
    with pytest.raises(TypeError):
        peft.get_peft_model(FAMILY["gpt2"].model(), peft.OFTConfig(oft_block_size=8, target_modules=["c_attn"]))
    model = peftkit.get_peft_model(FAMILY["gpt2"].model(), OFTConfig(oft_block_size=8))
    assert [p for p, _ in model.base_model.adapter_layers()] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_conv_forward_is_the_rotated_kernel_which_peft_computes_only_when_merged(tmp_path):
    """PEFT 0.21's unmerged OFT Conv2d unfolds and re-folds the input (summing overlapping patches), so a
    k x k > 1 convolution does not even start at the base; peftkit convolves with ``W R^T``, which is
    what PEFT's merged weights hold."""
    family = FAMILY["convnet"]
    base_out = family.run(family.model())
    ref_cfg, our_cfg = configs("convnet", r=1, oft_block_size=0)
    assert (family.run(peft.get_peft_model(family.model(), ref_cfg)) - base_out).abs().max() > 1e-2
    torch.testing.assert_close(family.run(peftkit.get_peft_model(family.model(), our_cfg)), base_out)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(family.model(), configs("convnet", r=1, oft_block_size=0, init_weights=False)[0])
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(ours), family.run(theirs.merge_and_unload()), atol=1e-5, rtol=0)
