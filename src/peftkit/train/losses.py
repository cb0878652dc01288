"""Causal-LM loss that computes logits only where a label is supervised.

Instruction tuning puts the loss on the response tokens only, yet ``model(**batch).loss`` projects every
position onto the vocabulary first: for SmolLM2 (49,152 tokens) a batch of 2 x 120 positions costs 47 MB of
logits, as much again for their log-softmax and their gradient, most of it for prompt and padding positions
whose label is -100. ``supervised_lm_loss`` gives the output layer only the hidden states that predict a
supervised token (through a pre-hook on ``get_output_embeddings()``), so the logits are ``N x vocab`` for the
``N`` response tokens. The value is the same mean cross-entropy over supervised tokens that transformers'
causal-LM loss computes (labels shifted by one, -100 ignored).

Prompt methods that prepend virtual tokens (prompt tuning, P-tuning) make the hidden sequence longer than
the labels; the virtual positions come first and carry no label, so the labels are aligned to the right end.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def supervised_lm_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100 (``batch["labels"]``)."""
    labels = batch["labels"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return model(**batch).loss
    target = labels[:, 1:]
    keep = target != -100

    def pick(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        virtual = hidden.shape[1] - labels.shape[1]
        if virtual < 0:
            raise ValueError(f"supervised_lm_loss: {hidden.shape[1]} hidden positions for "
                             f"{labels.shape[1]} labels; the model dropped positions")
        return (hidden[:, virtual : virtual + labels.shape[1] - 1][keep],) + tuple(args[1:])

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    handle = head.register_forward_pre_hook(pick)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return F.cross_entropy(logits.float(), target[keep])


def supervised_tokens(labels: Tensor) -> int:
    """How many positions ``supervised_lm_loss`` averages over."""
    return int((labels[:, 1:] != -100).sum())


