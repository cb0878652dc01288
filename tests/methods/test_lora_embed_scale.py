"""LoRA on a scaled embedding (Gemma's ``embed_scale``: the forward multiplies the rows): the update is scaled as
the base rows are, as peft does; a merge needs no scale (the merged rows go through the same forward)."""

from __future__ import annotations

import peft
import torch
from torch import nn

import peftkit


class ScaledEmbedding(nn.Embedding):
    def __init__(self, n: int, d: int, scale: float) -> None:
        super().__init__(n, d)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = ScaledEmbedding(20, 8, scale=8 ** 0.5)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed_tokens(ids))


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def test_lora_on_a_scaled_embedding_matches_peft_and_merges():
    ids = torch.tensor([[1, 5, 7, 19]])
    kw = {"r": 2, "target_modules": ["embed_tokens"], "init_lora_weights": False}
    theirs = peft.get_peft_model(_model(), peft.LoraConfig(**kw))
    ours = peftkit.get_peft_model(_model(), peftkit.LoraConfig(**kw))
    ours.load_state_dict(theirs.state_dict(), strict=False)
    with torch.no_grad():
        for (n, p), (m, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            if "lora" in n:
                p.copy_(q)
        base = _model()(ids)
        expected = theirs(ids)
        got = ours(ids)
        assert (expected - base).abs().max() > 1e-2  # the update matters
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        unscaled = got - (got - base) * (1 - 1 / 8 ** 0.5)  # what the update gives without the scale
        assert (unscaled - expected).abs().max() > 1e-3
        merged = ours.merge_and_unload()(ids)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
