"""Mixed-adapter batches: every row of a routed batch equals that row run alone through its adapter."""

from __future__ import annotations

import pytest
import torch

from peftkit import IA3Config, LoraConfig, get_peft_model
from peftkit.methods.ia3 import IA3Adapter
from peftkit.methods.lora.layer import LoraAdapter

from .families import FAMILY, V

BASE = "__base__"


def _lora_model():
    model = get_peft_model(FAMILY["llama"].model(), LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False, target_modules="all-linear", lora_dropout=0.1))
    model.add_adapter("wide", LoraConfig(
        r=8, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules="all-linear",
        rank_pattern={"down_proj": 3}, alpha_pattern={"q_proj": 5.0}))
    model.add_adapter("qk", LoraConfig(r=5, init_lora_weights=False, target_modules=["q_proj", "k_proj"]))
    return model.eval()


def _ia3_model():
    model = get_peft_model(FAMILY["llama"].model(), IA3Config(init_ia3_weights=False))
    model.add_adapter("other", IA3Config(init_ia3_weights=False))
    model.add_adapter("attn", IA3Config(init_ia3_weights=False, target_modules=["k_proj", "v_proj", "o_proj"],
                                        feedforward_modules=["o_proj"]))
    return model.eval()


def _row_alone(model, name, ids):
    if name == BASE:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(name)
    return model(input_ids=ids).logits


def _no_loop(monkeypatch, cls):
    def boom(*args, **kwargs):
        raise AssertionError("the generic per-adapter loop ran instead of the batched path")
    monkeypatch.setattr(cls, "forward", boom)


def _check_rows(model, names, ids, monkeypatch, cls):
    with torch.no_grad():
        expected = [_row_alone(model, n, ids[i : i + 1])[0] for i, n in enumerate(names)]
        with monkeypatch.context() as m:
            _no_loop(m, cls)
            mixed = model(input_ids=ids, adapter_names=names).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5, msg=f"row {i} ({n})")
    assert all(layer.routing is None for _, layer in model.base_model.adapter_layers())


def test_lora_mixed_ranks_rslora_patterns(monkeypatch):
    model = _lora_model()
    names = ["wide", BASE, "default", "qk", "wide", "default", "qk", BASE]
    ids = torch.randint(0, V, (len(names), 6))
    _check_rows(model, names, ids, monkeypatch, LoraAdapter)
    # the rows' deltas are non-trivial: adapters differ from each other and from the base
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert (mixed[0] - _row_alone(model, BASE, ids[:1])[0]).abs().max() > 1e-3


def test_ia3_mixed_with_feedforward_targets(monkeypatch):
    model = _ia3_model()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.adapters["default"].feedforward
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.adapters["attn"].feedforward
    names = ["other", "default", BASE, "attn", "default", "other"]
    ids = torch.randint(0, V, (len(names), 5))
    _check_rows(model, names, ids, monkeypatch, IA3Adapter)


def test_lora_and_ia3_on_the_same_layers():
    model = get_peft_model(FAMILY["llama"].model(), LoraConfig(r=4, init_lora_weights=False,
                                                                target_modules=["k_proj", "v_proj"]))
    model.add_adapter("ia3", IA3Config(init_ia3_weights=False, target_modules=["v_proj"], feedforward_modules=[]))
    model.eval()
    names = ["ia3", "default", BASE, "ia3"]
    ids = torch.randint(0, V, (len(names), 5))
    with torch.no_grad():
        expected = [_row_alone(model, n, ids[i : i + 1])[0] for i, n in enumerate(names)]
        mixed = model(input_ids=ids, adapter_names=names).logits
    for i in range(len(names)):
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_generate_mixed_equals_each_row_alone(kind):
    model = _lora_model() if kind == "lora" else _ia3_model()
    names = ["qk", BASE, "default", "wide"] if kind == "lora" else ["attn", BASE, "default", "other"]
    ids = torch.randint(0, V, (len(names), 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for i, n in enumerate(names):
            if n == BASE:
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[i : i + 1], **kwargs)
            else:
                model.set_adapter(n)
                alone = model.generate(input_ids=ids[i : i + 1], **kwargs)
            assert torch.equal(mixed[i], alone[0]), (i, n)


def test_cache_follows_in_place_weight_changes():
    model = _lora_model()
    names = ["default", "wide"]
    ids = torch.randint(0, V, (2, 4))
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=names).logits
        for _, adapter in model.base_model.adapters("wide"):
            adapter.lora_B.mul_(3.0)
        after = model(input_ids=ids, adapter_names=names).logits
        expected = _row_alone(model, "wide", ids[1:])[0]
    torch.testing.assert_close(after[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1e-4


def test_gradients_through_batched_path_equal_the_loop(monkeypatch):
    names = ["wide", "default", BASE, "wide"]
    ids = torch.randint(0, V, (4, 5))

    def grads(use_batched):
        torch.manual_seed(0)
        model = _lora_model()
        model.base_model.mark_trainable(extra=["wide", "default"])
        with monkeypatch.context() as m:
            if not use_batched:
                m.setattr(LoraAdapter, "batched_forward", classmethod(lambda cls, *a: None))
            model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
        return {f"{p}.{n}": a.lora_A.grad.clone() for n in ("wide", "default") for p, a in model.base_model.adapters(n)}

    batched, loop = grads(True), grads(False)
    assert batched.keys() == loop.keys() and all(g.abs().sum() > 0 for g in loop.values())
    for key in loop:
        torch.testing.assert_close(batched[key], loop[key], atol=1e-6, rtol=1e-5)


def test_active_dropout_declines_to_the_loop():
    model = _lora_model().train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    out = layer.base_layer(x)
    index = torch.tensor([0, 1])
    adapters = [layer.adapters["default"], layer.adapters["wide"]]
    assert LoraAdapter.batched_forward(adapters, layer.base_layer, x, out, index, {}) is None
    model.eval()
    assert LoraAdapter.batched_forward(adapters, layer.base_layer, x, out, index, {}) is not None


def test_bad_adapter_names_raise_clear_errors():
    model = _lora_model()
    ids = torch.randint(0, V, (3, 4))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(input_ids=ids, adapter_names=["nope", "wide", BASE])
    with pytest.raises(ValueError, match=r"2 entries but the batch has 3 rows.*'default'.*'wide'"):
        model(input_ids=ids, adapter_names=["wide", "default"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zzz'\]"):
        model.generate(input_ids=ids, adapter_names=["zzz", "wide", BASE], max_new_tokens=2)
    assert all(layer.routing is None for _, layer in model.base_model.adapter_layers())


def test_methods_without_a_batched_path_use_the_loop():
    from peftkit import FourierFTConfig

    model = get_peft_model(FAMILY["llama"].model(), FourierFTConfig(n_frequency=16, init_weights=False))
    model.add_adapter("lora", LoraConfig(r=3, init_lora_weights=False))
    model.add_adapter("f2", FourierFTConfig(n_frequency=8, init_weights=False, random_loc_seed=5))
    model.eval()
    names = ["f2", "lora", "default", BASE, "f2"]
    ids = torch.randint(0, V, (len(names), 5))
    with torch.no_grad():
        expected = [_row_alone(model, n, ids[i : i + 1])[0] for i, n in enumerate(names)]
        mixed = model(input_ids=ids, adapter_names=names).logits
    for i in range(len(names)):
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5)
        assert (expected[0] - _row_alone(model, BASE, ids[:1])[0]).abs().max() > 1e-4  # f2 does something
