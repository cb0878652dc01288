"""LoRA's ``lora_bias`` (B with a bias: the adapter adds ``s (B A x + b)``) against peft 0.21.2: parameter count,
file keys, outputs both ways, merge into the base bias (created on a bias-free base, removed on unmerge)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError


class Net(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6, bias=bias)
        self.conv = nn.Conv2d(3, 4, 3, bias=bias)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(x).flatten(1), self.conv(img).flatten(1)], dim=1)


X, IMG = torch.randn(2, 8), torch.randn(2, 3, 6, 6)


def _pair(bias: bool = True):
    torch.manual_seed(0)
    net = Net(bias)
    cfg = dict(r=2, lora_alpha=4, target_modules=["lin", "conv"], lora_bias=True)
    ours = peftkit.get_peft_model(copy.deepcopy(net), peftkit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return net, ours, theirs


@pytest.mark.parametrize("base_bias", [True, False])
def test_lora_bias_matches_peft_both_ways(tmp_path, base_bias):
    net, ours, theirs = _pair(base_bias)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X, IMG), theirs(X, IMG), atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "peft/adapter_model.safetensors")
    assert sorted(a) == sorted(b) and any(k.endswith("lora_B.bias") for k in a)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(X, IMG), theirs(X, IMG), atol=1e-5, rtol=0)


@pytest.mark.parametrize("base_bias", [True, False])
def test_lora_bias_merges_into_the_base_bias(tmp_path, base_bias):
    net, ours, theirs = _pair(base_bias)
    theirs.save_pretrained(tmp_path)
    model = peftkit.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path)
    before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    with torch.no_grad():
        unmerged = model(X, IMG)
        model.merge_adapter()
        torch.testing.assert_close(model(X, IMG), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    after = {n: p for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    assert sorted(after) == sorted(before) and all(torch.equal(after[n], before[n]) for n in before)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(X, IMG), unmerged, atol=1e-5, rtol=1e-5)
    assert (merged.lin.bias is not None) and (merged.conv.bias is not None)


def test_lora_bias_trains_and_is_refused_where_peft_refuses():
    _, ours, _ = _pair()
    ours(X, IMG).pow(2).mean().backward()
    biases = [p for n, p in ours.named_parameters() if n.endswith("bias_B")]
    assert len(biases) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in biases)
    with pytest.raises(ConfigError, match="lora_bias"):
        peftkit.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="lora_bias"):
        peftkit.LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="embeddings"):
        peftkit.get_peft_model(nn.Sequential(nn.Embedding(5, 4)), peftkit.LoraConfig(target_modules=["0"], lora_bias=True))
