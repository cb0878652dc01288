"""Hybrids as configs of configs: MAM (prefix + scaled parallel adapter) and UniPELT (gated adapter + prefix + LoRA)."""

from __future__ import annotations

import pytest
import torch

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.adapters.hybrid import HybridConfig, MamConfig, UniPeltConfig
from peftkit.methods.prompt.prefix_tuning import PrefixTuningConfig

from ..families import FAMILY, nudge_trainable

GPT2 = FAMILY["gpt2"]


@pytest.fixture(scope="module")
def roberta_base():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig())


def test_roberta_base_counts_are_the_sum_of_the_parts(roberta_base):
    d, L = 768, 12
    model = get_peft_model(roberta_base, MamConfig())
    try:  # prefix 30 x 2 L d + parallel adapter 12 x (2 d 512 + 512 + d)
        assert model.get_nb_trainable_parameters()[0] == 30 * 2 * L * d + 9_452_544
    finally:
        model.unload()
    model = get_peft_model(roberta_base, UniPeltConfig())
    try:  # Pfeiffer (r16) + gate, prefix 10 + a gate per layer, LoRA r8 on q, v + a gate on each
        assert model.get_nb_trainable_parameters()[0] == (
            894_528 + L * (d + 1) + 10 * 2 * L * d + L * (d + 1) + 2 * L * 8 * (d + d) + 2 * L * (d + 1))
    finally:
        model.unload()


def test_mam_with_a_zero_adapter_equals_prefix_tuning_alone():
    parts = {"prefix_tuning": {"num_virtual_tokens": 3}, "parallel_adapter": {"bottleneck_size": 4}}
    mam = get_peft_model(GPT2.model(), MamConfig(parts=parts)).eval()
    prefix = get_peft_model(GPT2.model(), PrefixTuningConfig(num_virtual_tokens=3)).eval()
    wte = mam.get_base_model().transformer.wte.adapters["default"]
    with torch.no_grad():
        prefix.get_base_model().transformer.wte.adapters["default"].embedding.weight.copy_(
            wte.parts["prefix_tuning"].embedding.weight)
        torch.testing.assert_close(GPT2.run(mam), GPT2.run(prefix), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(GPT2.run(mam), GPT2.run(GPT2.model()))  # the prefix acts from the start


def _pooled(g, pooling):
    return g.mean(dim=1, keepdim=True) if pooling == "mean" else g


@pytest.mark.parametrize("pooling", ["token", "mean"])
def test_unipelt_gates_scale_each_part(pooling):
    parts = {"pfeiffer": {"bottleneck_size": 4, "reduction_factor": None}, "lora": {"r": 2}}
    model = get_peft_model(FAMILY["llama"].model(), UniPeltConfig(parts=parts, gate_pooling=pooling)).eval()
    mlp = model.get_base_model().model.layers[0].mlp
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 37)
    with torch.no_grad():
        hyb = mlp.down_proj.adapters["default"]
        hyb.parts["pfeiffer"].up_weight.normal_()
        h = mlp.down_proj.base_layer(x)
        new = hyb.parts["pfeiffer"](mlp.down_proj.base_layer, x, h.clone())  # parts own their input
        g = _pooled(torch.sigmoid(hyb.gates["pfeiffer"](h)), pooling)  # a sequential adapter's gate reads h
        torch.testing.assert_close(mlp.down_proj(x), h + g * (new - h), atol=1e-6, rtol=1e-5)
        lq = q.adapters["default"]
        lq.parts["lora"].lora_B.normal_()
        xq = torch.randn(2, 3, 32)
        hq = q.base_layer(xq)
        newq = lq.parts["lora"](q.base_layer, xq, hq.clone())  # LoRA adds into it in place
        gq = _pooled(torch.sigmoid(lq.gates["lora"](xq)), pooling)  # LoRA's gate reads the layer input
        torch.testing.assert_close(q(xq), hq + gq * (newq - hq), atol=1e-6, rtol=1e-5)
    assert model.get_nb_trainable_parameters()[0] == (
        2 * (4 * 33 + 32 * 5 + 33)  # Pfeiffer on down_proj (d = 32) + its gate
        + 2 * (2 * (32 + 32) + 33 + 2 * (32 + 16) + 33))  # LoRA r2 on q (32 -> 32) and v (32 -> 16) + gates


def test_gated_split_ffn_adapter_has_one_gate_reading_the_ffn_input():
    """A parallel adapter on BERT's split FFN: one gate, on the piece holding the parameters, reading the FFN input."""
    config = HybridConfig(parts={"parallel_adapter": {"bottleneck_size": 4, "init_weights": "bert"}}, gated=True)
    model = get_peft_model(FAMILY["bert"].model(), config).eval()
    layer = model.get_base_model().bert.encoder.layer[0]
    tap, add = layer.intermediate.dense.adapters["default"], layer.output.dense.adapters["default"]
    assert list(tap.gates) == ["parallel_adapter"] and not list(add.gates)
    a, inter = torch.randn(2, 5, 32), torch.randn(2, 5, 37)
    with torch.no_grad():
        layer.intermediate.dense(a)  # the tap stashes g(a) s A(a) for the add piece
        z = tap.parts["parallel_adapter"].bottleneck(a) * torch.sigmoid(tap.gates["parallel_adapter"](a))
        torch.testing.assert_close(layer.output.dense(inter), layer.output.dense.base_layer(inter) + z,
                                   atol=1e-6, rtol=1e-5)
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 * 33 + 32 * 5 + 33)  # no task_type: no head trains


# -- UniPELT's prefix gate --------------------------------------------------------------------------------
PREFIX_ONLY = {"prefix_tuning": {"num_virtual_tokens": 3}}


def _prefix_gates(model):
    """(attention layer index, hybrid adapter on its query projection, that layer) for every prefix gate."""
    out = []
    for module in model.get_base_model().modules():
        adapter = getattr(module, "adapters", {"default": None})["default"] if hasattr(module, "adapters") else None
        if getattr(adapter, "prefix_layer", None) is not None:
            out.append((adapter.prefix_layer, adapter, module))
    return sorted(out, key=lambda t: t[0])


def _by_hand(model, family):
    """The gated model's output rebuilt from parts: capture each attention layer's input x_l, gate the prefix
    ``G_l = mean_seq sigmoid(W x_l + b)`` by hand into a plain cache, run the base model on it."""
    from transformers import DynamicCache

    gates, seen = _prefix_gates(model), {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
             for i, _, layer in gates]
    try:
        got = family.run(model)
    finally:
        for h in hooks:
            h.remove()
    prefix = model.get_base_model().get_input_embeddings().adapters["default"].parts["prefix_tuning"]
    cache = DynamicCache()
    with torch.no_grad():
        for (i, adapter, _), (k, v) in zip(gates, prefix.layers(2)):
            g = torch.sigmoid(adapter.gates["prefix_tuning"](seen[i])).mean(dim=1).view(-1, 1, 1, 1)
            cache.update(k * g, v * g, i)
        torch.manual_seed(1)
        inputs = family.inputs()
        with model.disable_adapter():
            expected = family.output(model(**inputs, past_key_values=cache))
    return got, expected


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_prefix_gate_scales_each_layers_prefix_keys_and_values(family):
    family = FAMILY[family]
    model = get_peft_model(family.model(), UniPeltConfig(parts=PREFIX_ONLY)).eval()
    gates = _prefix_gates(model)
    assert [i for i, _, _ in gates] == [0, 1]  # one gate per attention layer, on its query projection
    with torch.no_grad():
        got, expected = _by_hand(model, family)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        ungated = get_peft_model(family.model(), MamConfig(parts=PREFIX_ONLY)).eval()
        ungated.get_base_model().get_input_embeddings().adapters["default"].parts["prefix_tuning"].embedding.weight \
            .copy_(model.get_base_model().get_input_embeddings().adapters["default"].parts["prefix_tuning"]
                   .embedding.weight)
        assert not torch.allclose(got, family.run(ungated), atol=1e-4)  # the gate is not the identity


def test_prefix_gate_parameters_act_and_train():
    model = get_peft_model(GPT2.model(), UniPeltConfig(parts=PREFIX_ONLY)).eval()
    _, adapter, _ = _prefix_gates(model)[1]
    gate = adapter.gates["prefix_tuning"]
    with torch.no_grad():
        before = GPT2.run(model)
        gate.bias += 2.0
        after = GPT2.run(model)
    assert (after - before).abs().max() > 1e-3
    model.train()
    GPT2.run(model).float().pow(2).mean().backward()
    for _, adapter, _ in _prefix_gates(model):
        assert adapter.gates["prefix_tuning"].weight.grad.abs().sum() > 0
        assert adapter.gates["prefix_tuning"].bias.grad.abs().sum() > 0
    d, L, n = 32, 2, 3
    assert model.get_nb_trainable_parameters()[0] == n * 2 * L * d + L * (d + 1)  # prefix + a gate per layer


def test_prefix_gate_is_not_applied_twice_while_decoding():
    """Cached generation: the prompt's pass gates the prefix in the cache; decoding steps leave it alone."""
    model = get_peft_model(GPT2.model(), UniPeltConfig(parts=PREFIX_ONLY)).eval()
    torch.manual_seed(1)
    ids = GPT2.inputs()["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        prefix_keys = first.past_key_values.layers[0].keys[..., :3, :].clone()
        step = model(input_ids=ids[:, :1], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(step.past_key_values.layers[0].keys[..., :3, :], prefix_keys, atol=0, rtol=0)
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)


def test_save_load_round_trip_with_prefix(tmp_path):
    parts = {"prefix_tuning": {"num_virtual_tokens": 3},
             "pfeiffer": {"bottleneck_size": 4, "reduction_factor": None}, "lora": {"r": 2}}
    model = get_peft_model(GPT2.model(), UniPeltConfig(parts=parts)).eval()
    nudge_trainable(model, 0.1)
    with torch.no_grad():
        expected = GPT2.run(model)
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(saved, UniPeltConfig) and sorted(saved.parts) == ["lora", "pfeiffer", "prefix_tuning"]
    assert saved.parts["lora"]["r"] == 2 and saved.parts["prefix_tuning"]["num_virtual_tokens"] == 3
    loaded = PeftModel.from_pretrained(GPT2.model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2.run(loaded), expected, atol=0, rtol=0)
    for (_, a, _), (_, b, _) in zip(_prefix_gates(model), _prefix_gates(loaded), strict=True):  # prefix gates too
        torch.testing.assert_close(b.gates["prefix_tuning"].weight, a.gates["prefix_tuning"].weight, atol=0, rtol=0)


def test_a_hybrid_without_prefix_runs_on_models_without_a_cache():
    config = MamConfig(parts={"parallel_adapter": {"bottleneck_size": 4}})
    family = FAMILY["vit"]
    base = family.run(family.model())
    torch.testing.assert_close(family.run(get_peft_model(family.model(), config).eval()), base, atol=0, rtol=0)


@pytest.mark.parametrize("parts, message", [
    ({"nonsense": {}}, r"parts: unknown method 'nonsense'"),
    ({"mam": {}}, r"parts\['mam'\]: a hybrid method cannot be a part"),
    ({"vera": {}}, r"parts\['vera'\]: .*with shared state cannot be a part"),
    ({"lora": {"rank": 4}}, r"parts\['lora'\]: .*rank"),
    ({}, r"HybridConfig.parts: expected"),
])
def test_bad_parts_are_config_errors(parts, message):
    with pytest.raises(ConfigError, match=message):
        HybridConfig(parts=parts)
