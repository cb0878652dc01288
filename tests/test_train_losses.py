"""supervised_lm_loss equals transformers' causal-LM loss (value and gradients) while projecting only the
supervised positions onto the vocabulary."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.train.losses import supervised_lm_loss, supervised_tokens


def _models():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                      eos_token_id=2))
    return {"llama": llama.eval(), "gpt2": gpt2.eval()}


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "prompt_tuning": lambda: peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_equals_the_full_logits_loss_and_its_gradients(family, method):
    base = _models()[family]
    batch = _batch()
    model = peftkit.get_peft_model(copy.deepcopy(base), CONFIGS[method]())
    reference = model(**batch).loss
    ref_grads = torch.autograd.grad(reference, [p for p in model.parameters() if p.requires_grad])
    ours = supervised_lm_loss(model, batch)
    grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    assert abs(float(ours) - float(reference)) <= 1e-5
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_projects_only_the_supervised_positions():
    model = _models()["llama"]
    batch = _batch()
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    supervised_lm_loss(model, batch)
    handle.remove()
    assert supervised_tokens(batch["labels"]) == 7 + 7 + 4  # labels 5..11 in rows 0, 1; 5..8 in row 2
    assert seen == [torch.Size([supervised_tokens(batch["labels"]), 100])]
