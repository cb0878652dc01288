"""What the workflow scripts share: a tiny Llama, token data, the result file."""

from __future__ import annotations

import json
import os
import sys

import torch

VOCAB = 64


def setup() -> str:
    """The output folder (argv[1]); checks that this process serves peftkit as `peft`."""
    import peftkit
    import peft

    assert peftkit.compat.serving_as_peft() and peft.PeftModel is peftkit.PeftModel, "peft is not served"
    torch.set_num_threads(1)
    return sys.argv[1]


def tiny_llama(tied: bool = False, seed: int = 0):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=1))


def token_rows(n: int = 16, length: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, VOCAB, (length,), generator=g),
             "labels": torch.randint(2, VOCAB, (length,), generator=g)} for _ in range(n)]


def files(folder: str) -> dict[str, list[str]]:
    """relative folder -> sorted file names, for every folder under ``folder``."""
    return {os.path.relpath(root, folder): sorted(names) for root, _, names in os.walk(folder)}


def write(out: str, result: dict) -> None:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
