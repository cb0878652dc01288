"""OFT / BOFT on float16 and bfloat16 models on the CPU: the Cayley solve and the block inverse run in float32
(linalg has no half-precision LU there), so forward, merge and unmerge work and agree with float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit

CONFIGS = {
    "oft-neumann": lambda: peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=["0"]),
    "oft-cayley": lambda: peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=["0"], use_cayley_neumann=False),
    "boft": lambda: peftkit.BOFTConfig(boft_block_size=4, target_modules=["0"]),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_low_precision_forward_merge_unmerge(name, dtype):
    torch.manual_seed(0)
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(16, 16)), CONFIGS[name]())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 16)
    with torch.no_grad():
        reference = model(x)  # float32
        model.to(dtype)
        out = model(x.to(dtype))
        w0 = model.base_model.model[0].base_layer.weight.clone()
        model.merge_adapter()
        merged = model(x.to(dtype))
        model.unmerge_adapter()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), reference, atol=tol, rtol=tol)
    torch.testing.assert_close(merged.float(), reference, atol=4 * tol, rtol=tol)
    assert torch.equal(model.base_model.model[0].base_layer.weight, w0)  # bit-exact unmerge
