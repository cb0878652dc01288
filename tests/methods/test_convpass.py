"""Convpass (arXiv 2208.07463): the bypass formula on values, start at the base, gradients, files, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit import ConvpassConfig, PeftModel, get_peft_model, tiny_models
from peftkit.config import ConfigError
from peftkit.methods.convpass import functional as CF
from peftkit.targeting import NotApplicableError, TargetError

from ..families import nudge_trainable

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vit():
    torch.manual_seed(0)
    return tiny_models.vit().eval()


def test_bypass_formula_by_hand():
    """Down, QuickGELU, 3x3 conv over the 2x2 patch grid ([CLS] alone on a 1x1 grid), QuickGELU, up, times s."""
    g = torch.Generator().manual_seed(1)
    d, c = 3, 2
    x = torch.randn(1, 5, d, generator=g)  # [CLS] + 2x2 patches
    wd, bd = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    wc, bc = torch.randn(c, c, 3, 3, generator=g), torch.randn(c, generator=g)
    wu, bu = torch.randn(d, c, generator=g), torch.randn(d, generator=g)
    act = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731
    h = act(x[0] @ wd.T + bd)  # (5, c)
    conv = torch.zeros(5, c)
    conv[0] = wc[:, :, 1, 1] @ h[0] + bc  # a 1x1 grid meets only the centre tap
    grid = h[1:].reshape(2, 2, c)
    for i in range(2):
        for j in range(2):
            acc = bc.clone()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < 2 and 0 <= j + dj < 2:
                        acc += wc[:, :, 1 + di, 1 + dj] @ grid[i + di, j + dj]
            conv[1 + 2 * i + j] = acc
    expected = 0.5 * (act(conv) @ wu.T + bu)
    got = CF.convpass(x, wd, bd, wc, bc, wu, bu, 0.5)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    # the [CLS] path is the same convolution on a 1x1 grid (the official code's form)
    cls = F.conv2d(h[0].reshape(1, c, 1, 1), wc, bc, padding=1).flatten()
    torch.testing.assert_close(CF.conv_tokens(h[None], wc, bc)[0, 0], cls, atol=1e-6, rtol=1e-6)


def test_model_output_is_base_plus_bypass_beside_attention_and_mlp():
    """Block by block: X' = X + Attn(LN1 X) + s C(LN1 X); X'' = X' + MLP(LN2 X') + s C(LN2 X')."""
    base = vit()
    model = get_peft_model(vit(), ConvpassConfig(dim=3, scale=0.7, dropout=0.0))
    nudge_trainable(model, 0.2)
    with torch.no_grad():
        got = model(pixel_values=PIXELS).logits
        h = base.vit.embeddings(PIXELS)
        for i, block in enumerate(base.vit.layers):
            adapted = model.base_model.model.vit.layers[i]
            att, mlp = adapted.attention.adapters["default"], adapted.mlp.adapters["default"]
            z = block.layernorm_before(h)
            h = h + block.attention(z)[0] + 0.7 * CF.convpass(z, att.down_weight, att.down_bias, att.conv_weight,
                                                              att.conv_bias, att.up_weight, att.up_bias, 1.0)
            z = block.layernorm_after(h)
            h = h + block.mlp(z) + 0.7 * CF.convpass(z, mlp.down_weight, mlp.down_bias, mlp.conv_weight,
                                                     mlp.conv_bias, mlp.up_weight, mlp.up_bias, 1.0)
        expected = base.classifier(base.vit.layernorm(h)[:, 0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_init_starts_at_base_with_official_init():
    base_out = vit()(pixel_values=PIXELS).logits
    model = get_peft_model(vit(), ConvpassConfig(dim=4))
    torch.testing.assert_close(model(pixel_values=PIXELS).logits, base_out, atol=0, rtol=0)
    a = model.base_model.model.vit.layers[0].mlp.adapters["default"]
    assert torch.equal(a.up_weight, torch.zeros(32, 4)) and not a.up_bias.any() and not a.conv_bias.any()
    centre = torch.zeros(4, 4, 3, 3)
    centre[:, :, 1, 1] = torch.eye(4)
    assert torch.equal(a.conv_weight, centre)  # identity on the centre tap (xavier_init=False)
    assert a.down_weight.abs().max() <= (6 / (4 + 32)) ** 0.5 and a.down_weight.std() > 0  # Xavier-uniform
    b = get_peft_model(vit(), ConvpassConfig(dim=4, xavier_init=True)).base_model.model.vit.layers[0].mlp
    assert b.adapters["default"].conv_weight[:, :, 0, 0].abs().sum() > 0


def test_targets_params_and_gradients():
    model = get_peft_model(vit(), ConvpassConfig(dim=4, dropout=0.0))
    paths = sorted(p for p, _ in model.base_model.adapter_layers())
    assert paths == [f"vit.layers.{i}.{m}" for i in range(2) for m in ("attention", "mlp")]
    d, c = 32, 4
    assert model.get_nb_trainable_parameters()[0] == 4 * (2 * d * c + 9 * c * c + 2 * c + d)  # 4 x 440
    nudge_trainable(model, 0.1)
    model.train()
    model(pixel_values=PIXELS).logits.pow(2).mean().backward()
    for n, p in model.named_parameters():
        if ".adapters." in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    only_ffn = get_peft_model(vit(), ConvpassConfig(dim=4, positions=["ffn"]))
    assert sorted(p for p, _ in only_ffn.base_model.adapter_layers()) == ["vit.layers.0.mlp", "vit.layers.1.mlp"]


def test_save_load_round_trip_and_file_keys(tmp_path):
    model = get_peft_model(vit(), ConvpassConfig(dim=4))
    nudge_trainable(model, 0.1)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=PIXELS).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    per = {f"{p}.{w}" for p in ("adapter_down", "adapter_conv", "adapter_up") for w in ("weight", "bias")}
    assert keys == {f"base_model.model.vit.layers.{i}.{m}.{k}" for i in range(2) for m in ("attention", "mlp")
                    for k in per}
    loaded = PeftModel.from_pretrained(vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=PIXELS).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("field, value", [("dim", 0), ("scale", "x"), ("xavier_init", 1), ("dropout", 1.0),
                                          ("positions", ["mlp"]), ("positions", [])])
def test_bad_config_values(field, value):
    with pytest.raises(ConfigError, match=f"ConvpassConfig.{field}"):
        ConvpassConfig(**{field: value})


def test_unsupported_models_and_targets_fail_before_any_change():
    with pytest.raises(NotApplicableError, match="not a ViT"):
        get_peft_model(tiny_models.llama(), ConvpassConfig())
    model = vit()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetError, match="'vit.layers.0.mlp.fc1' maps width 32 to 37"):
        get_peft_model(model, ConvpassConfig(target_modules=["fc1"]))
    with pytest.raises(NotApplicableError, match="'vit.embeddings.patch_embeddings.projection' is a Conv2d"):
        get_peft_model(model, ConvpassConfig(target_modules=["projection"]))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_non_square_sequence_is_refused():
    with pytest.raises(ValueError, match="not \\[CLS\\] \\+ a square grid"):
        CF.grid_side(6)
