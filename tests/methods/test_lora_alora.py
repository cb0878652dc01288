"""Activated LoRA (``LoraConfig(alora_invocation_tokens=[...])``) against peft 0.21.2: the adapter acts only from
the last invocation sequence of each row on, in forward and in greedy ``generate`` (offsets from the prompt), with
an explicit ``alora_offsets=``, in mixed batches; files load both ways; merging and bad configs are refused."""

from __future__ import annotations

import copy
import threading
import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora import alora

INV = [7, 8, 9]  # the invocation sequence
INV2 = [5, 6]  # a second aLoRA's
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _cfg(lib, tokens=INV, targets=TARGETS, **kw):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                          alora_invocation_tokens=tokens, **kw)


def _perturb(model, seed: int = 1) -> None:
    """Seeded noise on every LoRA factor (B starts at zero: the adapter would be the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _pair(**kw):
    """peft's model (perturbed) and ours with the same weights, from peft's state dict."""
    base = _base()
    theirs = peft.get_peft_model(copy.deepcopy(base), _cfg(peft, **kw)).eval()
    _perturb(theirs)
    ours = peftkit.get_peft_model(copy.deepcopy(base), _cfg(peftkit, **kw)).eval()
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return base, theirs, ours


def _ids() -> torch.Tensor:
    """Row 0: the invocation twice (the last one counts), row 1: none, row 2: at the very end, row 3: a partial
    match only (7, 8 without 9)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 99, (4, 14), generator=g)
    ids[0, 2:5] = torch.tensor(INV)
    ids[0, 8:11] = torch.tensor(INV)
    ids[2, 11:14] = torch.tensor(INV)
    ids[3, 6:8] = torch.tensor(INV[:2])
    return ids


def _logits(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def test_offsets_as_peft():
    from peft.tuners.lora.variants import calculate_alora_offsets

    ids = _ids()
    configs = {"default": _cfg(peftkit)}
    expected = calculate_alora_offsets({"default": _cfg(peft)}, "default", ids)
    assert alora.calculate_offsets(configs, "default", ids) == expected == [6, None, 3, None]
    names = ["default", "default", "__base__", "default"]
    assert alora.calculate_offsets(configs, "default", ids, names) == [6, None, None, None]


def test_forward_matches_peft_and_adapts_only_from_the_invocation():
    base, theirs, ours = _pair()
    ids = _ids()
    ref, got, plain = _logits(theirs, input_ids=ids), _logits(ours, input_ids=ids), _logits(base, input_ids=ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # rows without the (whole) invocation sequence: the base model alone
    torch.testing.assert_close(got[[1, 3]], plain[[1, 3]], atol=1e-6, rtol=0)
    # row 0: positions before the last invocation are the base's (causal), from it on the adapter acts
    torch.testing.assert_close(got[0, :8], plain[0, :8], atol=1e-6, rtol=0)
    assert (got[0, 8:] - plain[0, 8:]).abs().amax(-1).min() > 1e-3
    assert (got[2, 11:] - plain[2, 11:]).abs().amax(-1).min() > 1e-3
    torch.testing.assert_close(got[2, :11], plain[2, :11], atol=1e-6, rtol=0)
    assert alora.current_offsets() is None  # nothing of the call stays behind


def test_generate_matches_peft():
    base, theirs, ours = _pair()
    ids = _ids()
    # left padding on row 1 with an attention mask: offsets count from the end, as peft
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref, got, plain = theirs.generate(**kw), ours.generate(**kw), base.generate(**kw)
    assert torch.equal(got, ref)
    assert torch.equal(got[[1, 3]], plain[[1, 3]])  # no invocation: no generated token is adapted
    assert not torch.equal(got[[0, 2]], plain[[0, 2]])
    # the offsets come from the prompt once: every generated token of an invoking row is adapted
    with torch.no_grad():
        full = ours(input_ids=got[[0]], attention_mask=torch.ones_like(got[[0]])).logits
    assert torch.equal(full[0, 13:-1].argmax(-1), got[0, 14:])


def test_explicit_alora_offsets_match_peft():
    _, theirs, ours = _pair()
    ids = _ids()
    offsets = [2, None, 14, 5]
    ref = _logits(theirs, input_ids=ids, alora_offsets=offsets)
    got = _logits(ours, input_ids=ids, alora_offsets=offsets)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _logits(ours, input_ids=ids))
    with pytest.raises(ValueError, match="alora_offsets"):
        _logits(ours, input_ids=ids, alora_offsets=[1, 2])  # one per row


def test_inputs_embeds_only_disables_alora_as_peft():
    base, theirs, ours = _pair()
    embeds = base.get_input_embeddings()(_ids()).detach()
    with pytest.warns(UserWarning, match="inputs_embeds"):
        got = _logits(ours, inputs_embeds=embeds)
    torch.testing.assert_close(got, _logits(base, inputs_embeds=embeds), atol=1e-6, rtol=0)


def test_training_gradients_match_peft():
    _, theirs, ours = _pair()
    ids = _ids()
    grads = []
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n.replace(".adapters.default", "").replace(".default.weight", "").replace(".default", ""):
                      p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for key, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][key], atol=1e-5, rtol=1e-5, msg=key)


def _mixed_pair():
    base = _base()
    theirs = peft.get_peft_model(copy.deepcopy(base), _cfg(peft), adapter_name="a")
    theirs.add_adapter("b", _cfg(peft, tokens=INV2))
    theirs.add_adapter("plain", peft.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    theirs.eval()
    _perturb(theirs)
    ours = peftkit.get_peft_model(copy.deepcopy(base), _cfg(peftkit), adapter_name="a")
    ours.add_adapter("b", _cfg(peftkit, tokens=INV2))
    ours.add_adapter("plain", peftkit.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ours.eval()
    for name in ("a", "b", "plain"):
        peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name),
                                          adapter_name=name)
    return base, theirs, ours


def test_mixed_batch_matches_peft():
    base, theirs, ours = _mixed_pair()
    ids = torch.cat([_ids(), _ids()[:2]])
    ids[1, 4:6] = torch.tensor(INV2)  # row 1 holds b's invocation, none of a's
    ids[5, 9:11] = torch.tensor(INV2)
    names = ["a", "b", "plain", "__base__", "b", "a"]
    ref = _logits(theirs, input_ids=ids, adapter_names=names)
    got = _logits(ours, input_ids=ids, adapter_names=names)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    plain = _logits(base, input_ids=ids)
    torch.testing.assert_close(got[3], plain[3], atol=1e-6, rtol=0)  # "__base__"
    torch.testing.assert_close(got[4], plain[4], atol=1e-6, rtol=0)  # b without b's invocation
    assert not torch.allclose(got[1, 4:], plain[1, 4:])  # b with it
    kw = dict(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(adapter_names=names, **kw), theirs.generate(adapter_names=names, **kw))


def test_files_load_both_ways(tmp_path):
    base, theirs, ours = _pair()
    ids = _ids()
    expected = _logits(theirs, input_ids=ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert loaded.peft_config["default"].alora_invocation_tokens == INV
    torch.testing.assert_close(_logits(loaded, input_ids=ids), expected, atol=1e-5, rtol=1e-5)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert back.peft_config["default"].alora_invocation_tokens == INV
    torch.testing.assert_close(_logits(back, input_ids=ids), expected, atol=1e-5, rtol=1e-5)


def test_merging_is_refused_and_changes_nothing():
    base = _base()
    model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules=TARGETS,
                                                                           task_type="CAUSAL_LM"), adapter_name="l")
    # the aLoRA on fewer layers: layers holding only "l" come first (merge) and last (merge_and_unload's order)
    model.add_adapter("a", _cfg(peftkit, targets=["v_proj"]))
    _perturb(model)
    model.base_model.set_adapter(["l", "a"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    out = _logits(model, input_ids=ids)
    for call in (model.merge_adapter, model.merge_and_unload, lambda: model.merge_adapter(["l", "a"]),
                 lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
            call()
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert all(not layer.merged_adapters for _, layer in model.base_model.adapter_layers())
    torch.testing.assert_close(_logits(model, input_ids=ids), out, atol=0, rtol=0)
    model.merge_adapter(["l"])  # the plain LoRA alone still merges
    assert all(layer.merged_adapters == ["l"] for _, layer in model.base_model.adapter_layers()
               if "l" in layer.adapters)


@pytest.mark.parametrize("tokens", [[], "789", [1.5], [True], [-1], [[7, 8]], 7])
def test_bad_invocation_tokens(tokens):
    with pytest.raises(ConfigError, match="alora_invocation_tokens"):
        _cfg(peftkit, tokens=tokens)


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"target_parameters": ["mlp.down_proj.weight"]}])
def test_refused_combinations(extra):
    with pytest.raises(ConfigError, match="alora_invocation_tokens.*" + next(iter(extra))):
        _cfg(peftkit, **extra)


def test_tuple_tokens_and_task_warning():
    assert _cfg(peftkit, tokens=(7, 8)).alora_invocation_tokens == [7, 8]
    with pytest.warns(UserWarning, match="CAUSAL_LM"):
        peftkit.LoraConfig(alora_invocation_tokens=INV)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftkit.LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens=INV)


def test_embedding_target_refused_and_model_unchanged():
    base = _base()
    names = [n for n, _ in base.named_modules()]
    cfg = peftkit.LoraConfig(target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM",
                             alora_invocation_tokens=INV)
    with pytest.raises(ValueError, match="alora_invocation_tokens.*Embedding"):
        peftkit.get_peft_model(base, cfg)
    assert [n for n, _ in base.named_modules()] == names


def test_gradient_checkpointing_refused_while_training():
    base, _, ours = _pair()
    base_model = ours.get_base_model()
    base_model.gradient_checkpointing_enable()
    ours.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        ours(input_ids=_ids(), labels=_ids())
    ours.eval()  # inference is not affected
    torch.testing.assert_close(_logits(ours, input_ids=_ids())[1], _logits(base, input_ids=_ids())[1])


def test_beam_search_refused_as_peft():
    _, _, ours = _pair()
    with pytest.raises(ValueError, match="Beam search"):
        ours.generate(input_ids=_ids(), max_new_tokens=2, num_beams=2, do_sample=False)


def test_offsets_are_per_thread():
    """Two threads calling one model at once each see their own call's offsets (state in a thread-local)."""
    _, _, ours = _pair()
    ids = _ids()
    inputs = [ids, ids.flip(0)]
    expected = [_logits(ours, input_ids=x) for x in inputs]
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(k):
        try:
            barrier.wait()
            for _ in range(3):
                results.setdefault(k, []).append(_logits(ours, input_ids=inputs[k]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(2):
        for got in results[k]:
            torch.testing.assert_close(got, expected[k], atol=1e-6, rtol=0)
