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


# -- LLaMA-Adapter against a straightforward implementation of its attention term ---------------------------
def _reference_attention_forward(self, *args, **kwargs):
    """PEFT's formulation, written out: ``Attn(x) + W_o (g softmax(q P_k^T / sqrt(d_h)) P_v)`` with the query
    recomputed from the hidden states (rotary embedding on Llama), the prompts' keys / values projected afresh,
    a second output-projection call (GPT-2: none, the term is added as it is) and no cache of any kind."""
    import math

    from transformers.models.llama.modeling_llama import rotate_half

    out = self.base_layer(*args, **kwargs)
    if self.disable_adapters or not self.active_adapters:
        return out
    base, attn = self.base_layer, out[0]
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    bsz, q_len, d = hidden.shape
    llama = hasattr(base, "q_proj")
    for name in self.active_adapters:
        adapter = self.adapters[name]
        heads, head_dim, n = adapter.num_heads, adapter.head_dim, adapter.adapter_len
        prompt = adapter.adaption_prompt
        if llama:
            q = base.q_proj(hidden)
            k, v = base.k_proj(prompt), base.v_proj(prompt)
        else:
            q, k, v = (base.c_attn(hidden).split(d, dim=2)[0], *base.c_attn(prompt).split(d, dim=2)[1:])
        q = q.view(bsz, q_len, heads, head_dim).transpose(1, 2)
        if llama:
            cos, sin = kwargs["position_embeddings"]
            q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        kv_heads = k.shape[-1] // head_dim
        k = k.view(1, n, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        v = v.view(1, n, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        weights = adapter.adaption_gate * torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim), dim=-1)
        term = (weights @ v).transpose(1, 2).reshape(bsz, q_len, heads * head_dim)
        attn = attn + (base.o_proj(term) if llama else term)
    return (attn, *out[1:])


def _adaption_model(family: str, bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if bias:  # the test family's Llama (grouped-query attention) with biases on its projections
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            attention_bias=True)).eval()
        with torch.no_grad():  # transformers initialises biases to zero
            for n, p in base.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.5)
    else:
        base = FAMILY[family].model()
    model = peftkit.get_peft_model(base, AdaptionPromptConfig(adapter_len=4, adapter_layers=2)).eval()
    perturb(model)
    return model


REFERENCE_CASES = [("llama", False), ("llama", True), ("gpt2", False)]


@pytest.mark.parametrize("family,bias", REFERENCE_CASES, ids=["llama-gqa", "llama-gqa-bias", "gpt2"])
def test_adaption_prompt_equals_reference_implementation(family, bias, monkeypatch):
    """The forward without a cache and every step of a cached ``generate`` (logits and tokens) equal the
    reference term above to 1e-5, on a left-padded batch."""
    from peftkit.methods.prompt.adaption_prompt import AttentionAdapterLayer

    model = _adaption_model(family, bias)
    ids, mask = batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, use_cache=True,
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        forward = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        generated = model.generate(**kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(AttentionAdapterLayer, "forward", _reference_attention_forward)
            ref_forward = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            ref_generated = model.generate(**kwargs)
            with model.disable_adapter():
                base = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert not torch.allclose(ref_forward, base, atol=1e-3)  # the prompts act
    torch.testing.assert_close(forward, ref_forward, atol=1e-5, rtol=0)
    assert torch.equal(generated.sequences, ref_generated.sequences)
    for step, ref_step in zip(generated.logits, ref_generated.logits, strict=True):
        torch.testing.assert_close(step, ref_step, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,bias", REFERENCE_CASES, ids=["llama-gqa", "llama-gqa-bias", "gpt2"])
def test_adaption_prompt_gradients_equal_reference_implementation(family, bias, monkeypatch):
    """With autograd (no key / value cache) the prompts and gates get the reference's gradients."""
    from peftkit.methods.prompt.adaption_prompt import AttentionAdapterLayer

    model = _adaption_model(family, bias)
    ids, mask = batch()

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours = grads()
    with monkeypatch.context() as patch:
        patch.setattr(AttentionAdapterLayer, "forward", _reference_attention_forward)
        expected = grads()
    assert sorted(ours) == sorted(expected) and len(ours) == 4  # a prompt and a gate in each of 2 layers
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
