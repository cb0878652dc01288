"""Any mix of ``torch.inference_mode()``, ``no_grad`` and training calls works, in any order, for every method
on a tiny Llama: nothing made under inference mode (caches, scratch buffers, index tensors) leaks into a later
autograd call, and the three eval modes give the same output."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.registry import get_method
from tests.families import FAMILY, nudge_trainable

EXAMPLES = {ex: (spec, kw) for spec in peftkit.list_methods() for ex, kw in spec.examples}
ON_LLAMA = ["lora", "rslora", "dora", "pissa", "adalora", "oft", "coft", "boft", "loha", "lokr", "ia3", "vera",
            "fourierft", "ssf", "houlsby", "pfeiffer", "parallel_adapter", "compacter", "prompt_tuning", "prefix",
            "p_tuning", "adaption_prompt", "ln_tuning", "last_k", "diff_pruning", "bitfit"]
IDS = torch.randint(0, 99, (4, 16), generator=torch.Generator().manual_seed(0))  # 64 tokens: LoRA's merged path


def _model(example: str) -> torch.nn.Module:
    spec, kw = EXAMPLES[example]
    torch.manual_seed(0)
    config = spec.config_cls(**kw)
    if hasattr(config, "task_type") and spec.category == "prompt":
        config.task_type = "CAUSAL_LM"
    model = peftkit.get_peft_model(FAMILY["llama"].model(), config)
    nudge_trainable(model, 0.1)
    return model.eval()


@pytest.mark.parametrize("example", ON_LLAMA)
def test_inference_mode_no_grad_and_training_mix(example):
    if example == "bitfit":  # Llama has no biases: BitFit is not applicable there
        with pytest.raises(Exception, match="bias"):
            _model(example)
        return
    model = _model(example)
    with torch.inference_mode():
        first = model(input_ids=IDS).logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, first, atol=1e-5, rtol=0)
    out = model(input_ids=IDS).logits  # eval with autograd, after an inference-mode call
    torch.testing.assert_close(out.detach(), first, atol=1e-5, rtol=0)
    out.sum().backward()
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with torch.inference_mode():
        model(input_ids=IDS)
    model(input_ids=IDS, labels=IDS).loss.backward()  # training right after an inference-mode call
    model.eval()
    with torch.inference_mode():
        again = model(input_ids=IDS).logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, again, atol=1e-5, rtol=0)
    assert get_method(model.peft_config["default"]).name
