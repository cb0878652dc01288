"""DoRA under torch.compile(fullgraph=True): no graph break in eval or in a training step (the norm cache is
Python state, so a compiled graph computes the norm itself), outputs and gradients equal to eager."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    model = peftkit.get_peft_model(LlamaForCausalLM(LlamaConfig(**LLAMA)),
                                   peftkit.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_dora_compiles_with_fullgraph_in_eval_and_training():
    eager = _model()
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises here
    for m in (eager, model):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, eager(input_ids=IDS).logits, atol=1e-5, rtol=0)
    for m in (eager, model):
        m.train()
    compiled(input_ids=IDS).logits.square().mean().backward()
    eager(input_ids=IDS).logits.square().mean().backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert len(grads) == 12 and all(g is not None for g in grads.values())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
