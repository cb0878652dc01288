"""``reduce_intruder_dimension`` (peft 0.21.2's ``peft.tuners.lora.intruders``) against peft on tiny Llama: the same
intruders found, the same new factors and outputs, the messages, the refused adapters; the math against a direct
formula, and an embedding's / Conv1D's factors in their own layout."""

from __future__ import annotations

import inspect

import peft
import pytest
import torch
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce

import peftkit
from peftkit.methods.lora import intruders
from peftkit.methods.lora.intruders import reduce_intruder_dimension
from tests.families import FAMILY
from tests.parity import perturb

LLAMA = FAMILY["llama"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(lib_kwargs=None, scale=0.6):
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, **(lib_kwargs or {}))
    theirs = peft.get_peft_model(LLAMA.model(), peft.LoraConfig(**kw))
    perturb(theirs, scale=scale)  # large enough that some top components of W + dW are new directions
    ours = peftkit.get_peft_model(LLAMA.model(), peftkit.LoraConfig(**kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def test_signature_matches_peft():
    assert inspect.signature(reduce_intruder_dimension).parameters.keys() == \
        inspect.signature(peft_reduce).parameters.keys()
    ours = {n: p.default for n, p in inspect.signature(reduce_intruder_dimension).parameters.items()}
    theirs = {n: p.default for n, p in inspect.signature(peft_reduce).parameters.items()}
    assert ours == theirs


@pytest.mark.parametrize("kw", [dict(top_k=10, threshold_epsilon=0.5), dict(top_k=4, threshold_epsilon=0.9,
                                                                               mitigation_lambda=0.3)])
def test_same_result_as_peft(kw):
    theirs, ours = _pair()
    their_log, our_log = [], []
    peft_reduce(theirs, logging_sink=their_log.append, **kw)
    reduce_intruder_dimension(ours, logging_sink=our_log.append, **kw)
    assert our_log == their_log
    assert any("Intruders:" in m for m in our_log) and our_log[-1] == "Enabling new adapter intruder_reduced"
    assert ours.active_adapters == theirs.active_adapters == ["intruder_reduced"]
    ref = peft.get_peft_model_state_dict(theirs, adapter_name="intruder_reduced")
    got = peftkit.get_peft_model_state_dict(ours, adapter_name="intruder_reduced")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    ours.set_adapter("default"), theirs.set_adapter("default")
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)


def test_math_against_direct_formula():
    torch.manual_seed(0)
    W = torch.randn(12, 10)
    B, A = torch.randn(12, 3), torch.randn(3, 10)
    s = 2.0
    merged = W + s * B @ A
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    U0 = torch.linalg.svd(W, full_matrices=False)[0]
    cos = (U.T @ U0).abs().max(1).values
    found = intruders.intruder_components(W, merged, top_k=5, threshold_epsilon=0.95)
    assert found == [i for i in range(5) if cos[i] < 0.95] and found
    B2, A2 = intruders.mitigated_factors(W, merged, found, 0.25, s, 3)
    target = (merged - 0.75 * (U[:, found] * S[found]) @ Vh[found] - W) / s
    Ut, St, Vt = torch.linalg.svd(target)
    torch.testing.assert_close(B2 @ A2, (Ut[:, :3] * St[:3]) @ Vt[:3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1), atol=1e-5, rtol=1e-5)  # sqrt(S) on both sides


@pytest.mark.parametrize("family,targets", [("llama", ["embed_tokens"]), ("gpt2", ["c_attn"])])
def test_embedding_and_conv1d_keep_their_layout(family, targets):
    fam = FAMILY[family]
    model = peftkit.get_peft_model(fam.model(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(model, scale=0.8)
    old = {p: a.delta_weight(layer.base_layer) for p, layer in model.base_model.adapter_layers()
           for n, a in layer.adapters.items()}
    reduce_intruder_dimension(model, top_k=10, threshold_epsilon=0.9, logging_sink=None)
    for path, layer in model.base_model.adapter_layers():
        a, new = layer.adapters["default"], layer.adapters["intruder_reduced"]
        assert new.lora_A.shape == a.lora_A.shape and new.lora_B.shape == a.lora_B.shape
        W = layer.base_layer.weight
        merged = W + old[path]
        found = intruders.intruder_components(W, merged, 10, 0.9)
        assert found, path
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        target = merged - 0.25 * (U[:, found] * S[found]) @ Vh[found] - W
        Ut, St, Vt = torch.linalg.svd(target)
        torch.testing.assert_close(new.delta_weight(layer.base_layer), (Ut[:, :4] * St[:4]) @ Vt[:4], atol=1e-4,
                                   rtol=1e-4)
    assert model.active_adapters == ["intruder_reduced"]


def test_refused_adapters():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.LoraConfig(
        r=4, target_modules=["q_proj"], kasa_config=peftkit.KasaConfig()))
    with pytest.raises(ValueError, match="KaSA"):
        reduce_intruder_dimension(model, logging_sink=None)
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        reduce_intruder_dimension(model, old_adapter_name="other", logging_sink=None)
    conv = peftkit.get_peft_model(FAMILY["convnet"].model(), peftkit.LoraConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="Conv2d"):
        reduce_intruder_dimension(conv, logging_sink=None)
    ia3 = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.IA3Config(target_modules=["q_proj"],
                                                                              feedforward_modules=[]))
    with pytest.raises(ValueError, match="not using LoRA"):
        reduce_intruder_dimension(ia3, logging_sink=None)
