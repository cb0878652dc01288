"""SVDiff: config validation, the spectral-shift math against the paper's formula (Linear, Conv2d, grouped Conv2d,
GPT-2 Conv1D), the hand-written gradient, which parameters train, start at the base, the file on disk (only the
shifts), bit-exact merge / unmerge, default targets on the tiny UNet, refusals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
import pytest
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer
from peftkit.methods.svdiff import SVDiffConfig
from peftkit.methods.svdiff import functional as SF
from peftkit.targeting import TargetError

from ..families import FAMILY


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)
        self.fc = nn.Linear(6, 5)
        self.c1d = Conv1D(4, 5)  # GPT-2 layout: weight (d_in=5, d_out=4)
        self.norm = nn.LayerNorm(4)

    def forward(self, img):
        h = F.silu(self.dw(F.silu(self.conv(img)))).mean(dim=(2, 3))
        return self.norm(self.c1d(torch.tanh(self.fc(h))))


PATHS = ["conv", "dw", "fc", "c1d"]


def _img():
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))


def _wrapped():
    torch.manual_seed(0)
    return peftkit.get_peft_model(Net(), SVDiffConfig(target_modules=PATHS))


@torch.no_grad()
def _perturb(model, scale=0.3):
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _layers(model):
    return dict(model.base_model.adapter_layers())


def _paper_weight(base, delta):
    """``U diag(ReLU(sigma + delta)) V^T`` from a float64 SVD of the weight as (d_out, d_in k k), in its layout."""
    w = base.weight.detach().double()
    m = w.t() if isinstance(base, Conv1D) else w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    shifted = (u * torch.relu(s + delta.detach().double())) @ vh
    return (shifted.t() if isinstance(base, Conv1D) else shifted.reshape(w.shape)).float()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"target_modules": 3}, "target_modules"), ({"exclude_modules": 1.5}, "exclude_modules"),
    ({"modules_to_save": "head"}, "modules_to_save"), ({"modules_to_save": ["head", ""]}, "modules_to_save"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"SVDiffConfig\.{field}"):
        SVDiffConfig(**kwargs)


def test_spectral_delta_is_the_paper_update_minus_the_base():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    u, s, vh = SF.factorize(w, torch.float64)
    delta = torch.randn(5, generator=g, dtype=torch.float64)
    delta[0] = -2 * s[0]  # the ReLU clips this singular value to zero
    torch.testing.assert_close(w + SF.spectral_delta(u, s, vh, delta), SF.shifted_weight(u, s, vh, delta))
    assert torch.linalg.svdvals(SF.shifted_weight(u, s, vh, delta)).min() < 1e-12  # one direction removed
    assert torch.equal(SF.spectral_delta(u, s, vh, torch.zeros(5, dtype=torch.float64)), torch.zeros(5, 8,
                                                                                                 dtype=torch.float64))


def test_hand_written_gradient_equals_autograd():
    g = torch.Generator().manual_seed(1)
    u, s, vh = SF.factorize(torch.randn(6, 4, generator=g))
    delta = torch.randn(4, generator=g)
    delta[1] = -s[1] - 1.0  # below zero: ReLU's gradient is 0 there
    grad_m = torch.randn(6, 4, generator=g)
    d = delta.clone().requires_grad_(True)
    (SF.spectral_delta(u, s, vh, d) * grad_m).sum().backward()
    ours = SF.delta_grad(u, s, vh, delta, grad_m)
    torch.testing.assert_close(ours, d.grad)
    assert ours[1] == 0


def test_forward_is_the_paper_formula_on_linear_conv_grouped_conv_and_conv1d():
    model = _wrapped()
    _perturb(model)
    layers = _layers(model)
    assert sorted(layers) == sorted(PATHS)
    img = _img()
    x = torch.randn(3, 6)
    with torch.no_grad():
        for path, x_in, op in [
            ("conv", img, lambda b, w: F.conv2d(img, w, b.bias, padding=1)),
            ("dw", torch.randn(2, 6, 5, 5), None),
            ("fc", x, lambda b, w: F.linear(x, w, b.bias)),
            ("c1d", torch.randn(3, 5), None),
        ]:
            layer = layers[path]
            base, delta = layer.base_layer, layer.adapters["default"].svdiff_delta
            w = _paper_weight(base, delta)
            if path == "dw":
                expected = F.conv2d(x_in, w, None, padding=1, groups=3)
            elif path == "c1d":
                expected = x_in @ w + base.bias
            else:
                expected = op(base, w)
            torch.testing.assert_close(layer(x_in), expected, atol=1e-5, rtol=1e-5)
            # the unfused path (a hook on the base declines the fused one) gives the same
            handle = base.register_forward_hook(lambda m, i, o: None)
            torch.testing.assert_close(layer(x_in), expected, atol=1e-5, rtol=1e-5)
            handle.remove()


def test_only_the_shifts_train_and_their_gradient_is_the_formulas():
    model = _wrapped()
    _perturb(model)
    trainable = {n.replace("base_model.model.", "").replace(".adapters.default", ""): p
                 for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{p}.svdiff_delta" for p in PATHS}
    # r = min(d_out, d_in k k): conv min(6, 27), dw min(6, 2 * 9), fc min(5, 6), c1d min(4, 5)
    assert {n: p.numel() for n, p in trainable.items()} == {
        "conv.svdiff_delta": 6, "dw.svdiff_delta": 6, "fc.svdiff_delta": 5, "c1d.svdiff_delta": 4}
    assert model.get_nb_trainable_parameters()[0] == 21
    img = _img()
    model(img).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, name
    # the same loss through the explicit formula W + U diag(ReLU(s + d) - s) V^T, differentiated by autograd
    layers = _layers(model)
    ref = {}
    for path in PATHS:
        a, base = layers[path].adapters["default"], layers[path].base_layer
        d = a.svdiff_delta.detach().clone().requires_grad_(True)
        m = SF.spectral_delta(a.svdiff_u, a.svdiff_sigma, a.svdiff_vh, d)
        ref[path] = (d, base.weight + SF.from_matrix(m, tuple(base.weight.shape), isinstance(base, Conv1D)))
    plain = model.get_base_model()
    c, dw, fc, c1d = (layers[p].base_layer for p in PATHS)
    h = F.silu(F.conv2d(img, ref["conv"][1], c.bias, padding=1))
    h = F.silu(F.conv2d(h, ref["dw"][1], None, padding=1, groups=3)).mean(dim=(2, 3))
    y = plain.norm(torch.tanh(F.linear(h, ref["fc"][1], fc.bias)) @ ref["c1d"][1] + c1d.bias)
    y.pow(2).sum().backward()
    for path in PATHS:
        torch.testing.assert_close(trainable[f"{path}.svdiff_delta"].grad, ref[path][0].grad, atol=1e-5, rtol=1e-4)


def test_starts_exactly_at_the_base_and_disable_is_the_base():
    torch.manual_seed(0)
    plain = Net()
    img = _img()
    with torch.no_grad():
        expected = plain(img)
        model = peftkit.get_peft_model(plain, SVDiffConfig(target_modules=PATHS))
        assert torch.equal(model(img), expected)
        _perturb(model)
        assert not torch.allclose(model(img), expected)
        with model.disable_adapter():
            assert torch.equal(model(img), expected)


def test_file_holds_only_the_dense_shifts_and_loads_exactly(tmp_path):
    model = _wrapped()
    _perturb(model)
    img = _img()
    with torch.no_grad():
        expected = model(img)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.conv.svdiff_delta": (6,), "base_model.model.dw.svdiff_delta": (6,),
        "base_model.model.fc.svdiff_delta": (5,), "base_model.model.c1d.svdiff_delta": (4,)}
    torch.manual_seed(0)
    fresh = Net()
    loaded = peftkit.PeftModel.from_pretrained(fresh, tmp_path)  # U, sigma, V recomputed from the base weights
    with torch.no_grad():
        assert torch.equal(loaded(img), expected)
    a = _layers(loaded)["fc"].adapters["default"]
    assert not any("svdiff_u" in k or "svdiff_sigma" in k for k in loaded.state_dict())  # never persisted
    torch.testing.assert_close(a.svdiff_sigma, torch.linalg.svdvals(fresh.fc.base_layer.weight.detach()))


def test_merge_and_bit_exact_unmerge():
    model = _wrapped()
    _perturb(model)
    base = model.get_base_model()
    before = {n: p.detach().clone() for n, p in base.named_parameters() if ".adapters." not in n}
    img = _img()
    with torch.no_grad():
        unmerged = model(img)
        fc = _layers(model)["fc"]
        paper = _paper_weight(fc.base_layer, fc.adapters["default"].svdiff_delta)  # before the merge changes W
        model.merge_adapter()
        torch.testing.assert_close(fc.base_layer.weight, paper, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(img), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    for n, p in base.named_parameters():
        if ".adapters." not in n:
            assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(model(img), unmerged)


def test_default_targets_on_the_tiny_unet():
    family = FAMILY["unet"]
    plain = family.model()
    with torch.no_grad():
        base_out = family.run(plain)
    model = peftkit.get_peft_model(family.model(), peftkit.SVDiffConfig())  # the public export
    layers = _layers(model)
    expected = {n for n, m in plain.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(layers) == expected and len(expected) == 83
    count = sum(min(m.weight.shape[0], m.weight[0].numel()) for n, m in plain.named_modules() if n in expected)
    assert model.get_nb_trainable_parameters()[0] == count
    with torch.no_grad():
        assert torch.equal(family.run(model), base_out)


def test_unsupported_layer_fails_naming_it_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    plain = Net()
    with pytest.raises(TargetError, match=r"'norm' is a LayerNorm"):
        peftkit.get_peft_model(plain, SVDiffConfig(target_modules=["fc", "norm"]))
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
