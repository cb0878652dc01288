"""LoRA weight math as pure functions, checked against the direct formulas."""

from __future__ import annotations

import pytest
import torch

from peftkit.methods.lora import functional as LF

from ..saved import saved_tensors


def test_lowrank_dora_norm_equals_the_direct_norm():
    g = torch.Generator().manual_seed(0)
    w0, A, B = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(40, 30), (5, 30), (40, 5)])
    direct = torch.linalg.vector_norm(w0 + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(LF.dora_norm_lowrank(w0, A, B, 0.7), direct, atol=1e-12, rtol=1e-12)


def test_dora_merge_then_unmerge_inverts():
    g = torch.Generator().manual_seed(1)
    w0, delta = torch.randn(6, 4, generator=g), 0.1 * torch.randn(6, 4, generator=g)
    m = torch.rand(6, generator=g) + 0.5
    merged, norm = LF.dora_merge(w0, delta, m, out_axis=0)
    torch.testing.assert_close(torch.linalg.vector_norm(merged, dim=1), m)  # the magnitude is the row norm
    torch.testing.assert_close(LF.dora_unmerge(merged, delta, m, norm, out_axis=0), w0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("niter", [None, 4])
def test_pissa_factors_hold_the_principal_subspace(niter):
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(20, 12, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    spectrum = torch.tensor([10.0, 5.0, 3.0] + [1e-3] * 9, dtype=torch.float64)  # a clear top-3 subspace
    w = (q1 * spectrum) @ q2.t()
    A, B = LF.pissa_factors(w, 3, scaling=2.0, niter=niter)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]  # the best rank-3 approximation
    torch.testing.assert_close(2.0 * B @ A, best, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(A @ A.t(), B.t() @ B, atol=1e-8, rtol=1e-8)  # balanced: both sqrt(S/s)


def test_olora_factors_are_the_qr_head():
    torch.manual_seed(0)
    w = torch.randn(10, 6, dtype=torch.float64)
    A, B = LF.olora_factors(w, 2)
    Q, R = torch.linalg.qr(w)
    assert torch.equal(A, R[:2]) and torch.equal(B, Q[:, :2])
    torch.testing.assert_close(B.t() @ B, torch.eye(2, dtype=torch.float64))


def test_conv_delta_is_b_times_a_per_kernel_position():
    A, B = torch.randn(3, 4, 2, 2), torch.randn(5, 3, 1, 1)
    delta = LF.lora_delta(A, B, 0.5)
    assert delta.shape == (5, 4, 2, 2)
    torch.testing.assert_close(delta[:, :, 1, 0], 0.5 * B[:, :, 0, 0] @ A[:, :, 1, 0])


def test_dora_scale_shift_backward_is_exact():
    from peftkit.methods.lora.kernels import ScaleShift as _ScaleShift

    torch.manual_seed(0)
    t = torch.randn(600, 5, dtype=torch.float64, requires_grad=True)  # > one row block
    scale = torch.rand(5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ScaleShift.apply, (t, scale, shift))
    assert torch.autograd.gradcheck(_ScaleShift.apply, (t, scale, None))


@pytest.mark.parametrize("separate_input", [False, True])  # True: dropout gave the adapter its own input
@pytest.mark.parametrize("transposed", [False, True])  # True: GPT-2 Conv1D weight layout (d_in, d_out)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_function_gradients_are_exact(separate_input, transposed, bias):
    from peftkit.methods.lora.kernels import LoraLinear

    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, **d)
    xd = torch.randn(7, 5, **d) if separate_input else None
    w = torch.randn(5, 4, **d) if transposed else torch.randn(4, 5, **d)
    b = torch.randn(4, **d) if bias else None
    A, B = torch.randn(3, 5, **d), torch.randn(4, 3, **d)

    def fn(x, xd, w, b, A, B):
        return LoraLinear.apply(x, xd, w, b, A, B, 0.7, transposed)

    assert torch.autograd.gradcheck(fn, (x, xd, w, b, A, B))
    base = x @ w if transposed else x @ w.t()
    expected = base + (0 if b is None else b) + 0.7 * ((x if xd is None else xd) @ A.t()) @ B.t()
    torch.testing.assert_close(fn(x, xd, w, b, A, B), expected)


@pytest.mark.parametrize("separate_input", [False, True])  # True: dropout gave the adapter its own input
@pytest.mark.parametrize("transposed", [False, True])  # True: GPT-2 Conv1D weight layout (d_in, d_out)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [3, 9])  # fewer / more rows than d_in: the scale folds into g or into W0
def test_dora_linear_function_is_the_formula_and_its_gradients(separate_input, transposed, bias, rows):
    from peftkit.methods.lora.kernels import DoraLinear

    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(rows, 5, **d)
    xd = torch.randn(rows, 5, **d) if separate_input else None
    w = torch.randn(5, 4, **d) if transposed else torch.randn(4, 5, **d)
    b = torch.randn(4, **d) if bias else None
    A, B, scale = torch.randn(3, 5, **d), torch.randn(4, 3, **d), torch.rand(4, **d) + 0.5

    def fn(x, xd, w, b, A, B, scale):
        return DoraLinear.apply(x, xd, w, b, A, B, scale, 0.7, transposed)

    assert torch.autograd.gradcheck(fn, (x, xd, w, b, A, B, scale))
    base = x @ w if transposed else x @ w.t()
    lora = 0.7 * ((x if xd is None else xd) @ A.t()) @ B.t()
    expected = scale * (base + lora) + (0 if b is None else b)  # the bias once, outside the scale
    torch.testing.assert_close(fn(x, xd, w, b, A, B, scale), expected)


def _full_size_outputs(fn, shape):
    """How many fresh tensors of ``shape``'s size (or larger) the ops under ``fn`` allocate (views of an
    argument's storage and in-place results are not counted)."""
    import math

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    size = math.prod(shape)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                    if isinstance(t, torch.Tensor)}
            out = func(*args, **kwargs)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() >= size and t.untyped_storage().data_ptr() not in seen:
                    Count.n += 1
            return out

    with Count():
        fn()
    return Count.n


def test_dora_step_forms_one_activation_sized_tensor_more_than_lora():
    """DoRA's training step over LoRA's: the pre-scale output ``u`` (kept for the magnitude gradient) and
    nothing else of (tokens x d_out) size: no ``g * scale``, no ``(1 - scale) b`` shift pass, no copy."""
    from torch import nn

    import peftkit

    torch.manual_seed(0)
    n, d_in, d_out = 600, 24, 40  # n > d_in: the input gradient scales W0, not g; n > one row block
    x = torch.randn(n, d_in, requires_grad=True)
    g = torch.randn(n, d_out)
    counts = {}
    for dora in (False, True):
        model = peftkit.get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)),
                                       peftkit.LoraConfig(r=4, target_modules=["0"], use_dora=dora)).train()
        counts[dora] = _full_size_outputs(lambda m=model: m(x).backward(g), (n, d_out))
    assert counts[False] == 1  # LoRA: the layer output, accumulated in place
    assert counts[True] == counts[False] + 1


def test_dora_norm_is_recomputed_in_every_training_forward():
    """In training the norm follows the weights even when they change behind autograd's back (``.data``)."""
    from torch import nn

    import peftkit

    torch.manual_seed(0)
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(6, 5)),
                                   peftkit.LoraConfig(r=2, target_modules=["0"], use_dora=True,
                                                      init_lora_weights=False)).train()
    x = torch.randn(4, 6)
    model(x)
    (_, adapter), = model.base_model.adapters("default")
    adapter.lora_B.data.mul_(3)  # no version bump
    base = model.get_base_model()[0].base_layer
    v = base.weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
    expected = (adapter.magnitude / v.norm(dim=1))[None, :] * (x @ v.t()) + base.bias
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_lora_with_dropout_on_a_frozen_base_keeps_the_dropped_input_not_x():
    """A's gradient reads the dropped input xd, and a frozen base needs no x: backward keeps xd, the dropout mask and
    h = xd A^T, as composing the modules does (x too would hold one (n, d_in) tensor more per layer)."""
    import peftkit

    model = peftkit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)),
                                   peftkit.LoraConfig(r=3, lora_dropout=0.5, target_modules=["0"])).train()
    x = torch.randn(8, 12, requires_grad=True)
    kept = saved_tensors(lambda: model(x).sum().backward(), model)
    assert not any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
    assert sorted(tuple(t.shape) for t in kept) == [(8, 3), (8, 12), (8, 12)]  # h, the dropout mask, xd
