"""Prompt methods against Hugging Face PEFT 0.21.2: adapters saved by one load into the other with the same
outputs (<= 1e-5) and the same greedy tokens. PEFT's own cached ``generate`` for prompt/prefix tuning is not
the reference (under transformers 5.x it re-injects the prompt at every step); a no-cache greedy loop over
PEFT's forward is."""

from __future__ import annotations

import json
import os

import pytest
import torch

import peftkit
from peftkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig

from ..families import FAMILY

peft = pytest.importorskip("peft")

ATOL = 1e-5


def peft_config(kind: str, task_type: str):
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=3)
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=3, encoder_hidden_size=8)
    if kind == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3)
    if kind == "prefix_proj":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3, prefix_projection=True,
                                       encoder_hidden_size=8)
    if kind == "adaption":
        return peft.AdaptionPromptConfig(task_type=task_type, adapter_len=4, adapter_layers=1)
    raise KeyError(kind)


def ours_config(kind: str, task_type: str):
    from peftkit.methods.prompt import AdaptionPromptConfig, PromptEncoderConfig

    return {
        "prompt": lambda: PromptTuningConfig(task_type=task_type, num_virtual_tokens=3),
        "p_tuning": lambda: PromptEncoderConfig(task_type=task_type, num_virtual_tokens=3, encoder_hidden_size=8),
        "prefix": lambda: PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3),
        "prefix_proj": lambda: PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3, prefix_projection=True,
                                                  encoder_hidden_size=8),
        "adaption": lambda: AdaptionPromptConfig(task_type=task_type, adapter_len=4, adapter_layers=1),
    }[kind]()


@torch.no_grad()
def perturb(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def inputs(family: str):
    torch.manual_seed(11)
    if family == "bert":
        return {"input_ids": torch.randint(0, 99, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    return {"input_ids": torch.randint(0, 99, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}


@torch.no_grad()
def reference_logits(ref, kind: str, family: str, x: dict) -> torch.Tensor:
    """PEFT's forward; for prefix tuning on BERT, PEFT's own prefix cache (``get_prompt``) fed to the model by
    hand: PEFT 0.21.2 looks for a ``past_key_values`` parameter, which transformers 5.x renamed ``cache``."""
    if not (kind.startswith("prefix") and family == "bert"):
        return ref(**x).logits
    n = ref.peft_config["default"].num_virtual_tokens
    mask = torch.cat([torch.ones(x["input_ids"].shape[0], n, dtype=torch.long), x["attention_mask"]], dim=1)
    return ref.get_base_model()(input_ids=x["input_ids"], attention_mask=mask,
                                cache=ref.get_prompt(x["input_ids"].shape[0])).logits


@torch.no_grad()
def greedy_loop(model, input_ids, steps: int = 4):
    """Greedy decoding by full recomputation (no cache): the reference for every generate call."""
    seq = input_ids
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


CASES = [(k, f) for k in ("prompt", "p_tuning", "prefix", "prefix_proj", "adaption") for f in ("gpt2", "llama")]
CASES += [("prompt", "bert"), ("prefix", "bert")]


def _task(family: str) -> str:
    return "SEQ_CLS" if family == "bert" else "CAUSAL_LM"


@pytest.mark.parametrize("kind,family", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_peft_file_loads_into_peftkit(kind, family, tmp_path):
    ref = peft.get_peft_model(FAMILY[family].model(), peft_config(kind, _task(family)))
    perturb(ref)
    ref.eval()
    ref.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(FAMILY[family].model(), tmp_path)
    x = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, reference_logits(ref, kind, family, x), atol=ATOL, rtol=0)
    if family != "bert":
        expected = greedy_loop(ref, x["input_ids"])
        got = ours.generate(input_ids=x["input_ids"], max_new_tokens=4, do_sample=False)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("kind,family", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_peftkit_file_loads_into_peft(kind, family, tmp_path):
    ours = peftkit.get_peft_model(FAMILY[family].model(), ours_config(kind, _task(family)))
    perturb(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        saved = json.load(f)
    ref_cfg = peft_config(kind, _task(family))
    assert saved["peft_type"] == str(getattr(ref_cfg.peft_type, "value", ref_cfg.peft_type))
    ref = peft.PeftModel.from_pretrained(FAMILY[family].model(), tmp_path)
    ref.eval()
    x = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(reference_logits(ref, kind, family, x), ours(**x).logits, atol=ATOL, rtol=0)
    if family != "bert":
        got = ours.generate(input_ids=x["input_ids"], max_new_tokens=4, do_sample=False)
        assert torch.equal(got, greedy_loop(ref, x["input_ids"]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_config_fields_match_peft(family):
    for kind in ("prompt", "prefix"):
        ref = peft.get_peft_model(FAMILY[family].model(), peft_config(kind, "CAUSAL_LM")).peft_config["default"]
        ours = peftkit.get_peft_model(FAMILY[family].model(), ours_config(kind, "CAUSAL_LM")).peft_config["default"]
        for field in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers"):
            assert getattr(ours, field) == getattr(ref, field), (kind, field)
