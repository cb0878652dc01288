"""The dtype of a new adapter's tensors (``kernel_helpers.adapter_dtype``), on float and bitsandbytes bases.

Before the rule was shared, only LoRA, (IA)3, the bottleneck adapters and the prompt methods handled a 4-/8-bit
base; AdaLoRA, LoHa, LoKr, OFT, BOFT, FourierFT, VeRA and SSF copied the packed weight's integer dtype and failed
with "Only Tensors of floating point and complex dtype can require gradients" (OFT / BOFT and SSF also read the
packed weight's shape). Each now builds float32 tensors and runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peftkit import get_peft_model
from peftkit.kernel_helpers import adapter_dtype
from peftkit.registry import get_method

bnb = pytest.importorskip("bitsandbytes")

from peftkit.quant import quantize_linear, quantize_model  # noqa: E402

IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(3))
# the methods that did not handle a quantized base before (see the module docstring)
METHODS = ["adalora", "loha", "lokr", "oft", "boft", "fourierft", "vera", "ssf"]


def _llama(bits: int) -> nn.Module:
    """Tiny Llama with rows a multiple of 64 wide (bitsandbytes' 4-bit block size on CPU), quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(model, bits)


def test_adapter_dtype_rule():
    lin = nn.Linear(64, 8)
    assert adapter_dtype(lin) == torch.float32
    assert adapter_dtype(lin.to(torch.float64)) == torch.float64
    for half in (torch.float16, torch.bfloat16):
        assert adapter_dtype(lin.to(half)) == torch.float32  # PEFT's autocast_adapter_dtype
        assert adapter_dtype(lin.to(half), keep_half=True) == half
        assert adapter_dtype(lin.weight.to(half), keep_half=True) == half  # a tensor stands for its layer
    assert adapter_dtype(None) == torch.float32
    assert adapter_dtype(nn.LayerNorm(4, elementwise_affine=False)) == torch.float32  # nothing to follow
    block = nn.Sequential(nn.Linear(4, 4)).to(torch.float64)
    assert adapter_dtype(block) == torch.float64  # a block: its first parameter


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_dtype_on_quantized_layer(bits):
    q = quantize_linear(nn.Linear(64, 8), bits)
    assert not q.weight.is_floating_point()
    assert adapter_dtype(q) == torch.float32
    assert adapter_dtype(q, keep_half=True) == torch.float32
    if bits == 4:  # the compute dtype a 4-bit layer names
        q16 = quantize_linear(nn.Linear(64, 8), 4, compute_dtype=torch.bfloat16)
        assert adapter_dtype(q16, keep_half=True) == torch.bfloat16
        assert adapter_dtype(q16) == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_method_builds_and_runs_on_quantized_base(method, bits):
    spec = get_method(method)
    _, kwargs = spec.examples[0]
    model = _llama(bits)
    pm = get_peft_model(model, spec.config_cls(**kwargs))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    wrapped = [m for m in pm.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert wrapped  # the base stays quantized
    with torch.no_grad():
        out = pm(input_ids=IDS).logits
    assert torch.isfinite(out).all()
    loss = pm(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
