"""DiffFit: config validation, the scaled-branch formula on a hand-built block, which parameters train, start at the
base, the file on disk, bit-exact merge / unmerge (zero gamma included), default targets on the tiny UNet, refusals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit
import pytest
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer
from peftkit.methods.difffit import DiffFitConfig
from peftkit.methods.difffit import functional as DF
from peftkit.targeting import NotApplicableError, TargetError

from ..families import FAMILY


class Block(nn.Module):
    """Two residual blocks: a transformer-like one (pre-norm MLP branch, then a bias-free projection branch) on
    tokens, and a ResNet-like one (GroupNorm, conv) on an image."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 6)
        self.proj = nn.Linear(6, 6, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, img):
        h = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        h = h + self.proj(h)
        g = img + self.conv2(F.silu(self.gn(img)))
        return torch.cat([h.flatten(), g.flatten()])


SCALE = ["fc2", "proj", "conv2"]


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 6, generator=g), torch.randn(2, 4, 5, 5, generator=g)


def _wrapped(**kw):
    torch.manual_seed(0)
    return peftkit.get_peft_model(Block(), DiffFitConfig(scale_modules=SCALE, **kw))


@torch.no_grad()
def _perturb(model, scale=0.3):
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _adapter(model, path):
    return dict(model.base_model.adapter_layers())[path].adapters["default"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"scale_modules": 3}, "scale_modules"), ({"scale_modules": ["fc2", ""]}, "scale_modules"),
    ({"train_bias": 1}, "train_bias"), ({"train_norm": "yes"}, "train_norm"),
    ({"train_bias": False, "train_norm": False, "scale_modules": []}, "scale_modules"),
    ({"target_modules": 5}, "target_modules"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"DiffFitConfig\.{field}"):
        DiffFitConfig(**kwargs)


def test_forward_is_the_paper_formula_on_a_hand_built_block():
    model = _wrapped()
    _perturb(model)
    x, img = _inputs()
    base = model.get_base_model()
    a = {p: _adapter(model, p) for p in ("norm", "fc1", "fc2", "proj", "gn", "conv2")}
    norm, fc1, fc2, proj, gn, conv2 = (dict(model.base_model.adapter_layers())[p].base_layer for p in a)
    assert not hasattr(a["fc1"], "difffit_gamma") or a["fc1"].difffit_gamma is None  # fc1 ends no branch
    with torch.no_grad():
        ln = F.layer_norm(x, (6,), norm.weight + a["norm"].weight_delta, norm.bias + a["norm"].bias_delta)
        hid = F.gelu(F.linear(ln, fc1.weight, fc1.bias + a["fc1"].bias_delta))
        h = x + a["fc2"].difffit_gamma * F.linear(hid, fc2.weight, fc2.bias + a["fc2"].bias_delta)
        h = h + a["proj"].difffit_gamma * F.linear(h, proj.weight)
        gnorm = F.group_norm(img, 2, gn.weight + a["gn"].weight_delta, gn.bias + a["gn"].bias_delta)
        branch = F.conv2d(F.silu(gnorm), conv2.weight, conv2.bias + a["conv2"].bias_delta, padding=1)
        g = img + a["conv2"].difffit_gamma.view(-1, 1, 1) * branch
        expected = torch.cat([h.flatten(), g.flatten()])
        torch.testing.assert_close(model(x, img), expected, atol=1e-6, rtol=1e-6)
        # the unfused path (a hook on the base declines the fused one) gives the same
        handle = base.fc2.base_layer.register_forward_hook(lambda m, i, o: None)
        torch.testing.assert_close(model(x, img), expected, atol=1e-6, rtol=1e-6)
        handle.remove()


def test_only_biases_norms_and_gamma_train_and_get_gradients():
    model = _wrapped()
    _perturb(model)
    trainable = {n.replace("base_model.model.", "").replace(".adapters.default", ""): p
                 for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {
        "norm.weight_delta", "norm.bias_delta", "fc1.bias_delta", "fc2.bias_delta", "fc2.difffit_gamma",
        "proj.difffit_gamma", "gn.weight_delta", "gn.bias_delta", "conv2.bias_delta", "conv2.difffit_gamma"}
    # LayerNorm 6 + 6, biases 10 + 6 + 4, GroupNorm 4 + 4, gamma 6 + 6 + 4
    assert model.get_nb_trainable_parameters()[0] == 56
    model(*_inputs()).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_starts_exactly_at_the_base():
    torch.manual_seed(0)
    plain = Block()
    x, img = _inputs()
    with torch.no_grad():
        expected = plain(x, img)
        model = peftkit.get_peft_model(plain, DiffFitConfig(scale_modules=SCALE))
        assert torch.equal(model(x, img), expected)
        assert all(torch.equal(a.difffit_gamma, torch.ones_like(a.difffit_gamma))
                   for p in SCALE for a in [_adapter(model, p)])


def test_save_load_round_trip_and_file_keys(tmp_path):
    model = _wrapped()
    _perturb(model)
    x, img = _inputs()
    with torch.no_grad():
        expected = model(x, img)
    model.save_pretrained(tmp_path)
    keys = {k.replace("base_model.model.", "") for k in load_file(tmp_path / "adapter_model.safetensors")}
    assert keys == {"norm.weight.delta", "norm.bias.delta", "fc1.bias.delta", "fc2.bias.delta", "fc2.difffit_gamma",
                    "proj.difffit_gamma", "gn.weight.delta", "gn.bias.delta", "conv2.bias.delta",
                    "conv2.difffit_gamma"}
    cfg = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, DiffFitConfig) and cfg.scale_modules == SCALE and cfg.selected_params["fc2.bias"]["nnz"] == 6
    torch.manual_seed(0)
    loaded = peftkit.PeftModel.from_pretrained(Block(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x, img), expected)


def test_merge_folds_gamma_and_unmerge_restores_bits_with_a_zero_gamma():
    model = _wrapped()
    _perturb(model)
    with torch.no_grad():
        _adapter(model, "fc2").difffit_gamma[1] = 0.0  # a channel switched off: its weight row is erased by the merge
        _adapter(model, "conv2").difffit_gamma[0] = 1e-39  # subnormal: the division overflows
    base = model.get_base_model()
    before = {n: p.detach().clone() for n, p in base.named_parameters() if ".adapters." not in n}
    x, img = _inputs()
    with torch.no_grad():
        unmerged = model(x, img)
        model.merge_adapter()
        fc2 = base.fc2.base_layer
        a = _adapter(model, "fc2")
        assert torch.equal(fc2.weight[1], torch.zeros(10))
        torch.testing.assert_close(fc2.weight, a.difffit_gamma[:, None] * before["fc2.base_layer.weight"])
        torch.testing.assert_close(fc2.bias, a.difffit_gamma * (before["fc2.base_layer.bias"] + a.bias_delta))
        torch.testing.assert_close(model(x, img), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    for n, p in base.named_parameters():
        if ".adapters." not in n:
            assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(model(x, img), unmerged)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x, img), unmerged, atol=1e-5, rtol=1e-5)


def test_functional_lost_channels_and_transposed_layout():
    w = torch.randn(3, 4)
    gamma = torch.tensor([2.0, 0.0, 0.5, 1.0])  # Conv1D layout (d_in, d_out): gamma scales columns
    scaled = DF.scale_weight(w, gamma, transposed=True)
    assert torch.equal(scaled, w * gamma)
    lost = DF.lost_channels(w, gamma, transposed=True)
    assert lost[0].tolist() == [1] and torch.equal(lost[1], w[:, 1:2])
    back = DF.restore_channels(DF.unscale_weight(scaled, gamma, transposed=True), lost, transposed=True)
    torch.testing.assert_close(back, w, atol=0, rtol=1e-6)
    assert DF.lost_channels(w, torch.ones(4), transposed=True) is None


def test_default_targets_on_the_tiny_unet():
    family = FAMILY["unet"]
    plain = family.model()
    with torch.no_grad():
        base_out = family.run(plain)
    model = peftkit.get_peft_model(family.model(), peftkit.DiffFitConfig())  # the public export
    scale = model.peft_config["default"].scale_modules
    blocks = [f"{b}.attentions.{i}.transformer_blocks.0" for b, i in
              [("down_blocks.0", 0), ("up_blocks.1", 0), ("up_blocks.1", 1), ("mid_block", 0)]]
    resnets = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
               "up_blocks.1.resnets.0", "up_blocks.1.resnets.1", "mid_block.resnets.0", "mid_block.resnets.1"]
    expected = {f"{b}.{m}" for b in blocks for m in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")}
    assert set(scale) == expected | {f"{r}.conv2" for r in resnets}
    modules = dict(plain.named_modules())
    norms = sum(p.numel() for m in plain.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                for p in m.parameters())
    biases = sum(p.numel() for n, p in plain.named_parameters()
                 if n.endswith(".bias") and not isinstance(modules[n.rpartition(".")[0]], (nn.LayerNorm, nn.GroupNorm)))
    gammas = sum(modules[p].weight.shape[0] for p in scale)
    assert model.get_nb_trainable_parameters()[0] == norms + biases + gammas
    with torch.no_grad():
        assert torch.equal(family.run(model), base_out)


def test_bad_targets_fail_naming_the_module_and_leave_the_model_untouched():
    torch.manual_seed(0)
    plain = Block()
    with pytest.raises(TargetError, match=r"scale_modules: 'gn' is a GroupNorm.*Linear"):
        peftkit.get_peft_model(plain, DiffFitConfig(scale_modules=["gn"]))
    with pytest.raises(TargetError, match=r"scale_modules: \['nope'\] matched no module"):
        peftkit.get_peft_model(plain, DiffFitConfig(scale_modules=["nope"]))
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    bare = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.raises(NotApplicableError, match="DiffFit"):
        peftkit.get_peft_model(bare, DiffFitConfig(scale_modules=[]))


def test_train_flags_and_target_modules_restrict_the_selection():
    model = _wrapped(train_norm=False, target_modules=["fc1", "fc2", "norm"])
    names = {n.replace("base_model.model.", "").replace(".adapters.default", "")
             for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"fc1.bias_delta", "fc2.bias_delta", "fc2.difffit_gamma", "proj.difffit_gamma",
                     "conv2.difffit_gamma"}
