"""Activation (gradient) checkpointing works with every registered method: the loss and the adapter gradients
with the base model's checkpointing on equal those without it (1e-5), for non-reentrant checkpointing and for the
reentrant kind with input gradients enabled (what ``prepare_model_for_kbit_training`` sets up).

GPT-2 and T5 are here for the prompt methods: GPT-2's backbone hands its checkpointed blocks no KV cache, and
T5's decoder blocks read their cross-attention keys/values from the cache, so a key/value prefix (prefix tuning,
P-tuning v2) has to reach them another way than on Llama or BERT (``peftkit.prompt_cache.prefix_kv``)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import get_method, get_peft_model
from peftkit.targeting import NotApplicableError

from .families import FAMILY
from .test_contract import make_config, perturb, unsupported_targets

CASES = [(spec, name, kwargs) for spec in peftkit.list_methods() for name, kwargs in spec.examples]
# the registry's hybrid examples leave the prefix part out (it needs a KV cache); here it is in
CASES += [(get_method("mam"), "mam-prefix", {"parts": {"prefix_tuning": {"num_virtual_tokens": 3},
                                                       "parallel_adapter": {"bottleneck_size": 4, "scaling": 4.0}}}),
          (get_method("unipelt"), "unipelt-prefix", {"parts": {"prefix_tuning": {"num_virtual_tokens": 3},
                                                               "lora": {"r": 2}}})]
# (family, reentrant): both kinds on the decoders (Llama, GPT-2) and the encoder-decoder (T5), the default
# non-reentrant kind on an encoder and a ViT
SETTINGS = [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True), ("t5", False), ("t5", True),
            ("bert", False), ("vit", False)]


def _loss_and_grads(model, family):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout masks: the checkpointed recomputation replays the same RNG state
    loss = family.run(model).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("setting", SETTINGS, ids=[f"{f}-{'reentrant' if r else 'non-reentrant'}" for f, r in SETTINGS])
@pytest.mark.parametrize("case", CASES, ids=[f"{s.name}-{n}" for s, n, _ in CASES])
def test_checkpointing_gives_the_same_adapter_gradients(case, setting):
    spec, _, kwargs = case
    family, reentrant = FAMILY[setting[0]], setting[1]
    if unsupported_targets(spec, family):
        pytest.skip(f"{spec.name} does not wrap what {family.name} targets")
    try:
        model = get_peft_model(family.model(), make_config(spec, kwargs, family))
    except NotApplicableError as err:
        pytest.skip(str(err))
    perturb(model)
    model.train()
    expected_loss, expected = _loss_and_grads(model, family)
    assert expected, "no adapter gradients"
    base = model.get_base_model()
    if reentrant:
        base.enable_input_require_grads()  # frozen embeddings: without this no gradient enters a checkpoint
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert base.is_gradient_checkpointing
    loss, got = _loss_and_grads(model, family)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-4, msg="loss")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
