"""LST on a ViT image classifier: the side network fed from the patch embeddings (h_0) and the block outputs, a
graph-free backbone, ViT's final LayerNorm and classifier with autograd, exact counts, files, refused models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification,
                          ViTModel)

import peftkit
from peftkit import LSTConfig, PeftModel
from peftkit.methods.lst import LSTLayer
from peftkit.methods.lst import functional as LF
from peftkit.methods.lst.wrapper import enter_block, record_block
from peftkit.registry import get_method
from peftkit.targeting import NotApplicableError

from ..families import nudge_trainable

D, N, R, LABELS = 32, 2, 4, 3  # hidden, blocks, reduction factor (d_s = 8), labels
VIT = dict(image_size=16, patch_size=4, hidden_size=D, num_hidden_layers=N, num_attention_heads=4,
           intermediate_size=64, num_labels=LABELS)


def _vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**VIT)).eval()


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _config(**kwargs) -> LSTConfig:
    return LSTConfig(reduction_factor=R, modules_to_save=["classifier"], **kwargs)


def _lst(**kwargs):
    model = peftkit.get_peft_model(_vit(), _config(**kwargs))
    torch.manual_seed(3)
    with torch.no_grad():
        nudge_trainable(model, 0.3)
    return model.eval()


def _states(vit: ViTModel, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """h_0 (the first block's input: the patch embeddings) and h_1 .. h_N of a plain ViT, recorded by hooks."""
    seen: list[torch.Tensor] = []
    handles = [vit.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))]
    handles += [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in vit.layers]
    with torch.no_grad():
        vit(x)
        assert torch.equal(seen[0], vit.embeddings(x))  # h_0: the patch embeddings (+ CLS, positions)
    for h in handles:
        h.remove()
    return seen[0], seen[1:]


def test_finds_the_vit_and_starts_at_the_base_bit_for_bit():
    x = _pixels()
    model = peftkit.get_peft_model(_vit(), _config())
    assert model.peft_config["default"].target_modules == {"vit"}
    assert isinstance(model.base_model.model.vit, LSTLayer)
    side = model.base_model.model.vit.adapters["default"]
    q = side.side_blocks[0].attention.q_proj  # ViTLayer(cfg) at the reduced width: d_s = 8, 4 heads of 2
    assert (q.in_features, q.out_features, side.side_blocks[0].attention.head_dim) == (D // R, D // R, 2)
    assert side.side_blocks[0].mlp.fc1.out_features == 64 // R
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, _vit()(pixel_values=x).logits, atol=0, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(pixel_values=x).logits, _vit()(pixel_values=x).logits, atol=0, rtol=0)


def test_side_network_equals_side_forward_by_hand():
    model = _lst(gate_temperature=0.5)
    x = _pixels()
    side = model.base_model.model.vit.adapters["default"]
    got, block_args = {}, []
    side.side_upsample.register_forward_pre_hook(lambda m, a: got.update(s=a[0]))
    side.side_blocks[0].register_forward_pre_hook(lambda m, a, k: block_args.append((a[1:], k)), with_kwargs=True)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        plain = _vit()
        h0, hs = _states(plain.vit, x)
        assert len(hs) == N and h0.shape == (2, 17, D)  # 16 patches + CLS
        mu = torch.sigmoid(side.side_gates / 0.5)
        s = LF.side_forward(h0, hs, list(side.side_downsamples), list(side.side_blocks), mu)
        # the same by hand, rung by rung (Eq. 1)
        ref = F.linear(h0, side.side_downsamples[0].weight, side.side_downsamples[0].bias)
        for i in range(N):
            down = side.side_downsamples[i + 1]
            ref = side.side_blocks[i](mu[i] * F.linear(hs[i], down.weight, down.bias) + (1 - mu[i]) * ref)
        y = hs[-1] + side.side_upsample(s)
        head = model.base_model.model.classifier.modules_to_save["default"]
        expected = head(plain.vit.layernorm(y)[:, 0])
    assert s.shape == (2, 17, D // R)
    torch.testing.assert_close(got["s"], s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits, plain(pixel_values=x).logits, atol=1e-3)
    # ViT passes its blocks no attention mask (and no head mask): the side blocks get None
    assert block_args[0] == ((None,), {})


def test_trainable_count_is_the_registry_closed_form():
    model = peftkit.get_peft_model(_vit(), _config())
    plain = _vit()
    form = get_method("lst").adapter_cls.param_count(plain.vit, _config(), "vit")
    ds, f = D // R, 64 // R
    block = 4 * (ds * ds + ds) + (ds * f + f) + (f * ds + ds) + 2 * 2 * ds  # Q K V O, FFN, two LayerNorms
    assert form == (N + 1) * (D * ds + ds) + N + N * block + (ds * D + D) == 2282
    assert model.get_nb_trainable_parameters()[0] == form + D * LABELS + LABELS
    side = model.base_model.model.vit.adapters["default"]
    assert sum(p.numel() for p in side.parameters()) == form
    bare = peftkit.get_peft_model(_vit(), LSTConfig(reduction_factor=R))  # no modules_to_save: the side network only
    assert bare.get_nb_trainable_parameters()[0] == form


def test_backbone_gets_no_gradients_and_keeps_no_activations():
    model = _lst().train()
    vit = model.base_model.model.vit.base_layer
    outputs, final, inside, depth = [], [], [], [0]
    def leave(module, args, out):
        outputs.append(out)
        depth[0] -= 1

    for block in vit.layers:  # prepended: the block's own output, before LST's hook replaces the last one
        block.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1), prepend=True)
        block.register_forward_hook(leave, prepend=True)
    vit.layernorm.register_forward_hook(lambda m, a, o: final.append((a[0], o)))
    modes = []  # autograd's mode inside each block (its attention) and at the final LayerNorm
    for block in vit.layers:
        block.attention.register_forward_pre_hook(lambda *a: modes.append(torch.is_grad_enabled()))
    vit.layernorm.register_forward_pre_hook(lambda *a: modes.append(torch.is_grad_enabled()))

    def pack(t):
        if depth[0]:
            inside.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # pixels that require grad: a block run with autograd would save tensors and give outputs requiring grad
        loss = model(pixel_values=_pixels().requires_grad_()).logits.pow(2).mean()
    assert torch.is_grad_enabled() and modes == [False] * N + [True]
    loss.backward()
    assert inside == []  # autograd saved nothing while a backbone block ran
    assert len(outputs) == N and not any(o.requires_grad for o in outputs)  # the blocks ran under no_grad
    (y, normed), = final  # ViT's final LayerNorm ran with autograd on the adapted state h_N + U s_N
    assert y.requires_grad and normed.grad_fn is not None and not torch.equal(y, outputs[-1])
    backbone = [n for n, _ in model.named_parameters() if ".adapters." not in n and ".modules_to_save." not in n]
    assert backbone and all(model.get_parameter(n).grad is None for n in backbone)
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}


def test_grad_mode_is_restored_when_a_block_fails():
    model = _lst().train()
    model.base_model.model.vit.base_layer.layers[0].register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(pixel_values=_pixels())
    assert torch.is_grad_enabled()


def test_save_load_round_trip_and_unload(tmp_path):
    model = _lst()
    x = _pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.vit."
    assert {f"{prefix}side_downsamples.{i}.{p}" for i in range(N + 1) for p in ("weight", "bias")} <= keys
    assert {f"{prefix}side_gates", f"{prefix}side_upsample.weight", f"{prefix}side_blocks.1.mlp.fc2.weight",
            "base_model.model.classifier.weight"} <= keys
    assert len(keys) == 2 * (N + 1) + 1 + N * 16 + 2 + 2
    loaded = PeftModel.from_pretrained(_vit(), tmp_path).eval()
    assert loaded.peft_config["default"].reduction_factor == R
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, atol=1e-6, rtol=1e-6)
        plain = loaded.unload()
        assert not any(isinstance(m, LSTLayer) for m in plain.modules())
        assert not any(fn in (record_block, enter_block) for m in plain.modules()
                       for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
        ref = _vit()
        ref.classifier.load_state_dict(plain.classifier.state_dict())
        torch.testing.assert_close(plain(pixel_values=x).logits, ref(pixel_values=x).logits, atol=0, rtol=0)


def test_a_cnn_and_a_bare_vit_model_are_refused_untouched():
    torch.manual_seed(0)
    cnn = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    num_labels=LABELS))
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    with pytest.raises(NotApplicableError, match="LST on ResNetForImageClassification: no transformer block stack"):
        peftkit.get_peft_model(cnn, LSTConfig())
    assert cnn.state_dict().keys() == before.keys() and all(torch.equal(cnn.state_dict()[k], v)
                                                            for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cnn.modules())
    with pytest.raises(NotApplicableError, match="LST on ViTModel: the model is itself the block stack"):
        peftkit.get_peft_model(ViTModel(ViTConfig(**VIT)), LSTConfig())
