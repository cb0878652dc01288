"""Generation with prompt methods: ``generate`` with and without a KV cache equals a no-cache greedy loop over
the adapted forward (batch of 2, left padding); with the adapter disabled it equals the base model's."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.methods.prompt import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)

from ..families import FAMILY

CONFIGS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "adaption_prompt": lambda: AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
}
CASES = [(m, f) for m in CONFIGS for f in ("gpt2", "llama")]
STEPS = 5


def setup_module() -> None:
    torch.set_num_threads(1)


@torch.no_grad()
def perturb(model) -> None:
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def batch():
    """Two rows, the first left-padded by two tokens."""
    torch.manual_seed(3)
    ids = torch.randint(1, 99, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


def positions(mask):
    """The position ids ``generate`` derives from a 2D mask (transformers' rule)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def greedy_loop(model, ids, mask, steps: int = STEPS):
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


def generate(model, ids, mask, use_cache: bool):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


@pytest.fixture(params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def adapted(request):
    method, family = request.param
    model = peftkit.get_peft_model(FAMILY[family].model(), CONFIGS[method]()).eval()
    perturb(model)
    return model, family


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_greedy_loop_over_forward(adapted, use_cache):
    model, _ = adapted
    ids, mask = batch()
    expected = greedy_loop(model, ids, mask)
    assert torch.equal(generate(model, ids, mask, use_cache), expected)


def test_adapter_acts_and_disabled_generates_like_base(adapted):
    model, family = adapted
    ids, mask = batch()
    base = FAMILY[family].model()
    expected = generate(base, ids, mask, use_cache=True)
    with model.disable_adapter():
        assert torch.equal(generate(model, ids, mask, use_cache=True), expected)
        assert torch.equal(generate(model, ids, mask, use_cache=False), expected)
    with torch.no_grad():  # the adapter acts (tiny random models may still pick the same tokens)
        ours = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        assert not torch.allclose(ours, base(input_ids=ids, attention_mask=mask).logits[:, -1])


def test_forward_with_cache_continues_the_prompted_sequence(adapted):
    """A prefill forward then a one-token step with its cache equals one forward over the whole sequence."""
    model, _ = adapted
    ids, mask = batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
        pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions(mask)[:, :-1],
                    use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions(mask)[:, -1:],
                     cache=pre.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda: PromptTuningConfig(num_virtual_tokens=3),
                                  lambda: PrefixTuningConfig(num_virtual_tokens=3)], ids=["prompt", "prefix"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_t5_generate_equals_greedy_loop(make, use_cache):
    model = peftkit.get_peft_model(FAMILY["t5"].model(), make()).eval()
    perturb(model)
    ids, mask = batch()
    dec = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                         use_cache=use_cache)
    assert torch.equal(got, dec)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_routes_rows_with_prompt_tuning(family, use_cache):
    model = peftkit.get_peft_model(FAMILY[family].model(), CONFIGS["prompt_tuning"]()).eval()
    perturb(model)
    ids, mask = batch()
    alone = generate(model, ids, mask, use_cache)
    with model.disable_adapter():
        base = generate(model, ids, mask, use_cache)
    mixed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                           use_cache=use_cache, pad_token_id=0, adapter_names=["default", "__base__"])
    assert torch.equal(mixed[0], alone[0]) and torch.equal(mixed[1], base[1])
