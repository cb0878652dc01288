"""LoRA on a whole ``nn.MultiheadAttention`` targeted by name (peft's ``lora.MultiheadAttention``, issue 19):
LoRA on the packed in-projection and on out_proj, peft's file keys, outputs equal to a plain attention whose
weights are set to ``W + s B A`` by hand (and to peft's where out_proj's update is zero: peft 0.21.2 applies that
one twice), merge / bit-exact unmerge, disable, delete, unload, files both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.lora.mha import MhaLoraLayer
from peftkit.mha import EffectiveWeightLayer

D, HEADS = 16, 4


class AttnNet(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
        self.fc = nn.Linear(D, D)

    def forward(self, x, key_padding_mask=None):
        out, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        return self.fc(out)


KEYS = {"base_model.model.attn.lora_A.weight": (4, D), "base_model.model.attn.lora_B.weight": (3 * D, 4),
        "base_model.model.attn.base_layer.out_proj.lora_A.weight": (4, D),
        "base_model.model.attn.base_layer.out_proj.lora_B.weight": (D, 4)}


def _inputs(batch_first: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, D, generator=g)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, 3:] = True
    return (x if batch_first else x.transpose(0, 1).contiguous()), kpm


def _pair(batch_first: bool = True, **kw):
    """(base, peft model with seeded non-trivial LoRA, peftkit model with peft's tensors)."""
    torch.manual_seed(0)
    base = AttnNet(batch_first)
    cfg = dict(r=4, lora_alpha=8, target_modules=["attn"], **kw)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**cfg))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    return base, ref, ours


def _factors(ours):
    """(A_in, B_in, A_out, B_out, s) of the peftkit model's default adapter (live parameters)."""
    attn = ours.base_model.model.attn
    a_in, a_out = attn.adapters["default"], attn.base_layer.out_proj.adapters["default"]
    return a_in.lora_A, a_in.lora_B, a_out.lora_A, a_out.lora_B, a_in.scaling


def _by_hand(base, factors):
    """The LoRA paper's model: ``base`` evaluated with ``in_proj_weight + s B A`` and ``out_proj.weight + s B A``
    (differentiable in the factors)."""
    a_in, b_in, a_out, b_out, s = factors
    params = {"attn.in_proj_weight": base.attn.in_proj_weight + s * b_in @ a_in,
              "attn.out_proj.weight": base.attn.out_proj.weight + s * b_out @ a_out}
    return lambda x, kpm: torch.func.functional_call(base, params, (x,), {"key_padding_mask": kpm})


def test_structure_and_file_keys_as_peft():
    _, ref, ours = _pair()
    attn = ours.base_model.model.attn
    assert isinstance(attn, MhaLoraLayer) and isinstance(attn.base_layer, nn.MultiheadAttention)
    assert isinstance(attn.base_layer.out_proj, EffectiveWeightLayer)
    state = peftkit.get_peft_model_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in state.items()} == KEYS
    assert {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref).items()} == KEYS
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 and all(".adapters.default." in n for n in trainable)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
def test_outputs_equal_peft_merged_and_unmerged(batch_first, mode):
    base, ref, ours = _pair(batch_first)
    x, kpm = _inputs(batch_first)
    for m in (base, ref, ours):
        getattr(m, mode)()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for grad in (True, False):  # without autograd in eval: torch's fused attention path
        with torch.set_grad_enabled(grad):
            expected = _by_hand(base, _factors(ours))(x, kpm).detach()
            got = ours(x, key_padding_mask=kpm)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert (got - base(x, key_padding_mask=kpm)).abs().max() > 1e-2
            ours.merge_adapter()
            torch.testing.assert_close(ours(x, key_padding_mask=kpm), expected, atol=1e-5, rtol=0)
            ours.unmerge_adapter()
            for n, p in ours.named_parameters():
                assert torch.equal(p, before[n]), f"unmerge did not restore {n} exactly"
            with ours.disable_adapter():
                torch.testing.assert_close(ours(x, key_padding_mask=kpm), base(x, key_padding_mask=kpm),
                                           atol=1e-6, rtol=0)


def test_gradients_reach_both_projections():
    """Equal to the gradients of the paper's model (weights ``W + s B A`` formed by hand)."""
    base, _, ours = _pair()
    x, kpm = _inputs()
    ours.train()
    base.train()
    ours(x, key_padding_mask=kpm).square().sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) if torch.is_tensor(t) else t for t in _factors(ours)]
    _by_hand(base, leaves)(x, kpm).square().sum().backward()
    live = _factors(ours)[:4]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in live)
    for param, leaf in zip(live, leaves[:4]):
        torch.testing.assert_close(param.grad, leaf.grad, atol=1e-5, rtol=1e-5)


def test_in_projection_equals_peft():
    """Where peft's double out_proj update does not enter (out_proj's B zero), outputs and gradients equal peft's."""
    base, ref, ours = _pair()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "out_proj.lora_B" in n:
                p.zero_()
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    x, kpm = _inputs()
    for m in (ref, ours):
        m.train()
    torch.testing.assert_close(ours(x, key_padding_mask=kpm), ref(x, key_padding_mask=kpm), atol=1e-5, rtol=0)
    ours(x, key_padding_mask=kpm).square().sum().backward()
    ref(x, key_padding_mask=kpm).square().sum().backward()
    ref_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    a_in, b_in = _factors(ours)[:2]
    torch.testing.assert_close(a_in.grad, ref_grads["base_model.model.attn.lora_A.weight"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_in.grad, ref_grads["base_model.model.attn.lora_B.weight"], atol=1e-5, rtol=1e-5)


def test_peft_applies_the_out_proj_update_twice():
    """The documented difference, pinned: peft's output is the hand-built model's with out_proj's update doubled."""
    base, ref, ours = _pair()
    x, kpm = _inputs()
    ref.eval()
    a_in, b_in, a_out, b_out, s = _factors(ours)
    with torch.no_grad():
        doubled = _by_hand(base, (a_in, b_in, a_out, 2 * b_out, s))(x, kpm)
        torch.testing.assert_close(ref(x, key_padding_mask=kpm), doubled, atol=1e-5, rtol=0)


def test_files_load_both_ways(tmp_path):
    base, ref, ours = _pair()
    x, kpm = _inputs()
    ref.eval()
    with torch.no_grad():
        expected_peft = ref(x, key_padding_mask=kpm)
        expected = _by_hand(base, _factors(ours))(x, kpm)
    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == KEYS
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    low = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", low_cpu_mem_usage=True)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        for model in (loaded, low):  # peft's tensors, the paper's numbers
            torch.testing.assert_close(model(x, key_padding_mask=kpm), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x, key_padding_mask=kpm), expected_peft, atol=1e-5, rtol=0)  # ours, in peft


def test_merge_and_unload_and_delete_give_plain_modules():
    base, ref, ours = _pair()
    x, kpm = _inputs()
    ours.eval()
    with torch.no_grad():
        expected = ours(x, key_padding_mask=kpm)
    twin = copy.deepcopy(ours)
    plain = ours.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention
    assert type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert sorted(n for n, _ in plain.named_parameters()) == sorted(n for n, _ in base.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x, key_padding_mask=kpm), expected, atol=1e-5, rtol=0)
    # a second adapter on the same attention; deleting both leaves the plain modules, weights untouched
    twin.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["attn"]))
    assert set(twin.base_model.model.attn.base_layer.out_proj.adapters) == {"default", "other"}
    twin.delete_adapter("default")
    assert set(twin.base_model.model.attn.base_layer.out_proj.adapters) == {"other"}
    twin.delete_adapter("other")
    model = twin.base_model.model
    assert type(model.attn) is nn.MultiheadAttention
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


def test_targeting_the_attention_leaves_out_proj_to_it():
    """A pattern that matches the attention and its out_proj adapts the attention as a whole."""
    _, _, ours = _pair()
    model = peftkit.get_peft_model(AttnNet(), peftkit.LoraConfig(r=4, target_modules=["attn", "out_proj"]))
    assert sorted(p for p, _ in model.base_model.adapter_layers()) == ["attn", "attn.base_layer.out_proj"]
    assert set(peftkit.get_peft_model_state_dict(model)) == set(KEYS)


def test_unsupported_variants_are_refused_as_peft():
    for kw, match in [({"use_dora": True}, "DoRA"), ({"init_lora_weights": "pissa"}, "pissa")]:
        model = AttnNet()
        with pytest.raises(ValueError, match=match):
            peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["attn"], **kw))
        assert type(model.attn) is nn.MultiheadAttention
    odd = nn.Module()
    odd.attn = nn.MultiheadAttention(D, HEADS, kdim=8, vdim=8)
    with pytest.raises(ValueError, match="one size"):
        peftkit.get_peft_model(odd, peftkit.LoraConfig(r=4, target_modules=["attn"]))
