"""Houlsby, Pfeiffer and parallel adapters: closed-form counts on RoBERTa-base, the formulas, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError
from peftkit.methods.adapters.bottleneck import HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig
from peftkit.targeting import NotApplicableError, TargetError

from ..families import FAMILY, nudge_trainable


@pytest.fixture(scope="module")
def roberta_base():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig())  # roberta-base shapes: d = 768, 12 layers, d_ff = 3072


def trainable(model) -> int:
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("config, expected", [
    (HoulsbyConfig(bottleneck_size=64), 2_379_264),  # 24 x (2 * 768 * 64 + 64 + 768)
    (PfeifferConfig(reduction_factor=16), 894_528),  # 12 x (2 * 768 * 48 + 48 + 768)
    (ParallelAdapterConfig(bottleneck_size=512), 9_452_544),  # 12 x (2 * 768 * 512 + 512 + 768)
])
def test_roberta_base_parameter_counts(roberta_base, config, expected):
    model = get_peft_model(roberta_base, config)
    try:
        assert trainable(model) == expected
    finally:
        model.unload()


def test_houlsby_layernorms_train_too(roberta_base):
    model = get_peft_model(roberta_base, HoulsbyConfig(bottleneck_size=64, train_layernorms=True))
    try:
        # 25 LayerNorms (embeddings + 2 per layer), weight and bias of width 768 each
        assert trainable(model) == 2_379_264 + 25 * 2 * 768
    finally:
        model.unload()


def _tiny_bert():
    return FAMILY["bert"].model()


@pytest.mark.parametrize("config_cls", [HoulsbyConfig, PfeifferConfig, ParallelAdapterConfig])
def test_zero_up_projection_gives_the_base(config_cls):
    family = FAMILY["llama"]
    base = family.run(family.model())
    model = get_peft_model(family.model(), config_cls(bottleneck_size=8, reduction_factor=None,
                                                      init_weights="lora")).eval()
    torch.testing.assert_close(family.run(model), base, atol=0, rtol=0)


def test_bert_init_is_near_identity_not_identity():
    family = FAMILY["bert"]
    base = family.run(family.model())
    out = family.run(get_peft_model(family.model(), HoulsbyConfig(bottleneck_size=8)).eval())
    assert not torch.equal(out, base)
    torch.testing.assert_close(out, base, atol=5e-2, rtol=0)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 5))

    def forward(self, x):
        return self.block(self.proj(x))


def test_sequential_formula_on_a_plain_path():
    torch.manual_seed(0)
    model = get_peft_model(Toy(), HoulsbyConfig(target_modules=["proj"], bottleneck_size=3, scaling=0.5,
                                                non_linearity="tanh"))
    adapter = model.base_model.model.proj.adapters["default"]
    x = torch.randn(4, 6)
    toy = model.get_base_model()
    h = toy.proj.base_layer(x)
    z = F.linear(torch.tanh(F.linear(h, adapter.down_weight, adapter.down_bias)), adapter.up_weight, adapter.up_bias)
    torch.testing.assert_close(model(x), toy.block(h + 0.5 * z), atol=1e-6, rtol=1e-5)
    assert adapter.down_weight.shape == (3, 5) and adapter.up_weight.shape == (5, 3)


def test_parallel_formula_on_a_block():
    torch.manual_seed(0)
    model = get_peft_model(Toy(), ParallelAdapterConfig(target_modules=["block"], bottleneck_size=3))
    adapter = model.base_model.model.block.adapters["default"]
    with torch.no_grad():
        adapter.up_weight.normal_()
    x = torch.randn(4, 6)
    toy = model.get_base_model()
    h = toy.proj(x)
    z = F.linear(F.relu(F.linear(h, adapter.down_weight, adapter.down_bias)), adapter.up_weight, adapter.up_bias)
    torch.testing.assert_close(model(x), toy.block.base_layer(h) + 4.0 * z, atol=1e-6, rtol=1e-5)


def test_parallel_on_bert_split_ffn_reads_the_ffn_input():
    torch.manual_seed(0)
    model = get_peft_model(_tiny_bert(), ParallelAdapterConfig(bottleneck_size=4)).eval()
    assert model.peft_config["default"].split_ffn == ["output.dense", "intermediate.dense"]
    layer = model.get_base_model().bert.encoder.layer[0]
    tap = layer.intermediate.dense.adapters["default"]
    with torch.no_grad():
        tap.up_weight.normal_()
        tap.up_bias.normal_()
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        a = layer.attention(h)[0]  # the FFN input
        inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense.base_layer(a))
        pa = F.linear(F.relu(F.linear(a, tap.down_weight, tap.down_bias)), tap.up_weight, tap.up_bias)
        expected = layer.output.LayerNorm(layer.output.dense.base_layer(inter) + 4.0 * pa + a)
        got = layer(h)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # parameters live on the tap (FFN input width 32 -> 4 -> 32); the output piece holds none
    assert not list(layer.output.dense.adapters["default"].parameters())
    assert trainable(model) == 2 * (4 * 33 + 32 * 5)  # two layers; no task_type, so no head trains


@pytest.mark.parametrize("config", [
    HoulsbyConfig(bottleneck_size=4, train_layernorms=True),
    ParallelAdapterConfig(bottleneck_size=4, non_linearity="gelu", init_weights="bert"),
])
def test_save_load_round_trip_exact(tmp_path, config):
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), config).eval()
    nudge_trainable(model, 0.05)
    with torch.no_grad():
        expected = family.run(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(family.model(), tmp_path).eval()
    assert type(loaded.peft_config["default"]) is type(config)
    with torch.no_grad():
        torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def test_unknown_role_names_the_field():
    with pytest.raises(ConfigError, match=r"positions.*'ffn_out'"):
        HoulsbyConfig(positions=["ffn_out"])
    with pytest.raises(ConfigError, match="non_linearity"):
        PfeifferConfig(non_linearity="softsign")
    with pytest.raises(ConfigError, match="reduction_factor"):
        PfeifferConfig(bottleneck_size=None, reduction_factor=None)


class NoFFN(nn.Module):
    """A model of a known family (llama) that lacks the FFN module the role table names."""

    config = {"model_type": "llama"}

    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.o_proj(x)


def test_missing_role_raises_before_any_change():
    model = NoFFN()
    before = [type(m) for m in model.modules()]
    with pytest.raises(NotApplicableError, match="no 'ffn' module"):
        get_peft_model(model, ParallelAdapterConfig(bottleneck_size=2))
    assert [type(m) for m in model.modules()] == before


def test_sequential_on_a_block_is_an_error():
    model = Toy()
    with pytest.raises(TargetError, match="'block' is a Sequential"):
        get_peft_model(model, HoulsbyConfig(target_modules=["proj", "block"]))
    assert isinstance(model.proj, nn.Linear)  # nothing was wrapped


def test_mixed_batch_routing_with_split_ffn_pieces():
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), ParallelAdapterConfig(bottleneck_size=4, init_weights="bert")).eval()
    model.add_adapter("other", HoulsbyConfig(bottleneck_size=4))
    ids = torch.randint(0, 99, (3, 7))
    with torch.no_grad():
        routed = model(input_ids=ids, adapter_names=["default", "other", "__base__"]).logits
        rows = []
        for i, name in enumerate(["default", "other"]):
            model.set_adapter(name)
            rows.append(model(input_ids=ids[i:i + 1]).logits)
        with model.disable_adapter():
            rows.append(model(input_ids=ids[2:]).logits)
    torch.testing.assert_close(routed, torch.cat(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_cls", [HoulsbyConfig, ParallelAdapterConfig])
def test_half_precision_base_gets_float32_adapters(config_cls):
    family = FAMILY["llama"]
    base = family.run(family.model().to(torch.bfloat16))
    model = get_peft_model(family.model().to(torch.bfloat16), config_cls(bottleneck_size=4, init_weights="lora"))
    assert {p.dtype for _, a in model.base_model.adapters() for p in a.parameters()} == {torch.float32}
    out = family.run(model.eval())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, base, atol=0, rtol=0)


# -- original_ln_before (AdapterHub's Pfeiffer / SeqBn placement) -----------------------------------------------
def test_original_ln_before_reads_the_normalised_output_and_adds_before_the_layernorm():
    torch.manual_seed(0)
    model = get_peft_model(_tiny_bert(), PfeifferConfig(bottleneck_size=4, reduction_factor=None,
                                                        original_ln_before=True)).eval()
    layer = model.get_base_model().bert.encoder.layer[0]
    norm = layer.output.LayerNorm  # the adapter sits on the FFN's LayerNorm, not on its output Linear
    adapter = norm.adapters["default"]
    assert not hasattr(layer.output.dense, "adapters")
    with torch.no_grad():
        adapter.up_weight.normal_()
        inter, r = torch.randn(2, 5, 37), torch.randn(2, 5, 32)
        h = layer.output.dense(inter)
        y = norm.base_layer(h + r)
        a = F.linear(F.relu(F.linear(y, adapter.down_weight, adapter.down_bias)), adapter.up_weight, adapter.up_bias)
        torch.testing.assert_close(layer.output(inter, r), norm.base_layer(h + r + a), atol=1e-6, rtol=1e-5)
    assert trainable(model) == 2 * (4 * 33 + 32 * 5)


def test_original_ln_before_round_trip_and_starts_at_base(tmp_path):
    family = FAMILY["bert"]
    base = family.run(family.model())
    config = PfeifferConfig(bottleneck_size=4, reduction_factor=None, original_ln_before=True, init_weights="lora")
    model = get_peft_model(family.model(), config).eval()
    torch.testing.assert_close(family.run(model), base, atol=0, rtol=0)
    nudge_trainable(model, 0.05)
    with torch.no_grad():
        expected = family.run(model)
    assert not torch.allclose(expected, base)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(family.model(), tmp_path).eval()
    assert loaded.peft_config["default"].original_ln_before is True
    with torch.no_grad():
        torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def test_original_ln_before_needs_a_post_ln_model():
    with pytest.raises(NotApplicableError, match="original_ln_before.*post-LN"):
        get_peft_model(FAMILY["llama"].model(), PfeifferConfig(original_ln_before=True))
    with pytest.raises(ConfigError, match="original_ln_before"):
        ParallelAdapterConfig(original_ln_before=True)
    with pytest.raises(ConfigError, match="original_ln_before"):
        PfeifferConfig(original_ln_before=True, train_layernorms=True)


@pytest.mark.parametrize("cls", [PfeifferConfig, HoulsbyConfig])
def test_layers_to_transform_filters_the_positions(cls):
    """Targets found from ``positions`` (full module paths) still pass through the layer filter."""
    model = get_peft_model(FAMILY["bert"].model(), cls(layers_to_transform=[1]))
    paths = [p for p, _ in model.base_model.adapter_layers()]
    assert paths and all(p.startswith("bert.encoder.layer.1.") for p in paths)
    every = [p for p, _ in get_peft_model(FAMILY["bert"].model(), cls()).base_model.adapter_layers()]
    assert len(every) == 2 * len(paths)
