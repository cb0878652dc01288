"""Prefix tuning on a model without a KV-cache interface (issue 19): peft 0.21.2 has no way to run it either.
Its forward hands the prefix over as ``past_key_values``: a model whose forward does not take that argument
fails at the first call (TypeError), one that swallows it in ``**kwargs`` runs as if there were no prefix.
peftkit refuses such a model at ``get_peft_model`` (NotApplicableError naming the methods that do apply) and
leaves it unchanged. Models whose backbone takes the cache (BERT / RoBERTa heads) work, see
tests/methods/test_prompt_peft.py."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

import peftkit
from peftkit.targeting import NotApplicableError


class NoCache(nn.Module):
    def __init__(self, swallow: bool) -> None:
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=50)
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)
        self.swallow = swallow

    @property
    def device(self):
        return self.lin.weight.device

    def get_input_embeddings(self):
        return self.emb

    def _forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        return self.lin(self.emb(input_ids) if inputs_embeds is None else inputs_embeds)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if kwargs and not self.swallow:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(kwargs)}")
        return self._forward(input_ids, attention_mask, inputs_embeds)


CFG = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
IDS = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize("swallow", [False, True], ids=["strict", "kwargs"])
def test_peftkit_refuses_and_leaves_the_model_unchanged(swallow):
    torch.manual_seed(0)
    model = NoCache(swallow)
    params = dict(model.named_parameters())
    with pytest.raises(NotApplicableError, match="KV-cache interface.*prompt_tuning"):
        peftkit.get_peft_model(model, peftkit.PrefixTuningConfig(**CFG))
    assert dict(model.named_parameters()) == params and all(p.requires_grad for p in params.values())


def test_peft_cannot_run_it_either():
    torch.manual_seed(0)
    strict = peft.get_peft_model(NoCache(False), peft.PrefixTuningConfig(**CFG))
    with pytest.raises(TypeError, match="past_key_values"):
        strict(input_ids=IDS)
    torch.manual_seed(0)
    base = NoCache(True)
    with torch.no_grad():
        expected = base(input_ids=IDS)
    swallowing = peft.get_peft_model(base, peft.PrefixTuningConfig(**CFG))
    with torch.no_grad():  # runs, but the prefix has no effect at all
        torch.testing.assert_close(swallowing(input_ids=IDS), expected, atol=0, rtol=0)
