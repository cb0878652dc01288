"""Composition blocks (Stack, Parallel, Average, Fuse): values, fusion-only training, serialize / reload, errors."""

from __future__ import annotations

import pytest
import torch

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.adapters.bottleneck import HoulsbyConfig, PfeifferConfig
from peftkit.methods.adapters.composition import Average, CompositionConfig, Fuse, Parallel, Stack
from peftkit.targeting import TargetError

from ..families import FAMILY

FAM = FAMILY["bert"]


def two_adapters():
    """Houlsby "a" (attention + FFN output) and Pfeiffer "b" (FFN output) with non-trivial weights."""
    torch.manual_seed(0)
    model = get_peft_model(FAM.model(), PfeifferConfig(bottleneck_size=4, reduction_factor=None), adapter_name="b")
    model.add_adapter("a", HoulsbyConfig(bottleneck_size=4))
    with torch.no_grad():
        for _, adapter in model.base_model.adapters():
            for p in adapter.parameters():
                p.normal_(0.0, 0.3)
    return model.eval()


def ffn_layer(model):
    return model.get_base_model().bert.encoder.layer[0].output.dense


def run_block(model, block, **kw):
    model.add_adapter("comp", CompositionConfig(block=block, **kw))
    model.set_adapter("comp")
    return model


def test_stack_parallel_average_values_at_a_layer():
    model = two_adapters()
    layer = ffn_layer(model)
    a, b = layer.adapters["a"], layer.adapters["b"]
    x = torch.randn(2, 3, 37)
    with torch.no_grad():
        h = layer.base_layer(x)
        ha, hb = a(layer.base_layer, x, h), b(layer.base_layer, x, h)
        expected = {
            "stack": b(layer.base_layer, x, ha),
            "parallel": h + (ha - h) + (hb - h),
            "average": 0.25 * ha + 0.75 * hb,
        }
        for name, block in [("stack", Stack("a", "b")), ("parallel", Parallel("a", "b")),
                            ("average", Average("a", "b", weights=[1.0, 3.0]))]:
            run_block(model, block)
            torch.testing.assert_close(layer(x), expected[name], atol=1e-6, rtol=1e-5)
            model.delete_adapter("comp")


def test_stack_equals_both_adapters_active_and_skips_absent_children():
    model = two_adapters()
    with torch.no_grad():
        model.set_adapter(["a", "b"])  # the engine runs active adapters in order: the same as Stack("a", "b")
        both = FAM.run(model)
        run_block(model, Stack("a", "b"))
        torch.testing.assert_close(FAM.run(model), both, atol=1e-6, rtol=1e-5)
    # at the attention output only "a" exists: the block is "a" there
    attn = model.get_base_model().bert.encoder.layer[0].attention.output.dense
    assert set(attn.adapters["comp"].kids) == {"a"}


def test_fuse_formula_and_fusion_only_training():
    model = two_adapters()
    run_block(model, Fuse("a", "b"), temperature=2.0)
    layer = ffn_layer(model)
    fuse = layer.adapters["comp"]
    x = torch.randn(2, 3, 37)
    with torch.no_grad():
        fuse.fusion_query.weight.normal_()
        h = layer.base_layer(x)
        o = torch.stack([layer.adapters[n](layer.base_layer, x, h) for n in ("a", "b")], dim=-2)
        scores = torch.einsum("...d,...kd->...k", fuse.fusion_query(h), fuse.fusion_key(o)) / 2.0
        expected = torch.einsum("...k,...kd->...d", scores.softmax(-1), fuse.fusion_value(o))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.comp." in n for n in trainable)
    d = 32  # 2 layers x (attention output + FFN output) x 3 (d^2 + d)
    assert model.get_nb_trainable_parameters()[0] == 4 * 3 * (d * d + d)


def test_fusion_value_starts_as_identity_so_fuse_mixes_children():
    model = two_adapters()
    run_block(model, Fuse("a", "b"))
    layer = ffn_layer(model)
    fuse = layer.adapters["comp"]
    with torch.no_grad():
        fuse.fusion_query.weight.zero_()  # uniform attention: the plain average of the children
        x = torch.randn(2, 3, 37)
        h = layer.base_layer(x)
        mean = 0.5 * (layer.adapters["a"](layer.base_layer, x, h) + layer.adapters["b"](layer.base_layer, x, h))
        torch.testing.assert_close(layer(x), mean, atol=1e-6, rtol=1e-5)


def test_composition_config_serializes_and_reloads(tmp_path):
    model = two_adapters()
    run_block(model, Fuse("a", "b"))
    with torch.no_grad():
        for p in ffn_layer(model).adapters["comp"].parameters():
            p.add_(0.1 * torch.randn_like(p))
        expected = FAM.run(model)
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path / "comp")
    assert isinstance(saved, CompositionConfig)
    assert saved.block == {"type": "Fuse", "children": ["a", "b"]}
    loaded = PeftModel.from_pretrained(FAM.model(), tmp_path / "b", adapter_name="b")
    loaded.load_adapter(tmp_path / "a", "a")
    loaded.load_adapter(tmp_path / "comp", "comp")
    loaded.set_adapter("comp")
    with torch.no_grad():
        torch.testing.assert_close(FAM.run(loaded.eval()), expected, atol=0, rtol=0)


def test_nested_blocks_round_trip_through_dicts():
    block = Stack(Average("a", Stack("b", "c"), weights=[1, 2]), Fuse("d", "e"))
    config = CompositionConfig(block=block)
    again = CompositionConfig.from_dict(config.to_dict())
    assert again.block == config.block == block.to_dict()
    assert again.tree.leaves() == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("block, message", [
    (Fuse("a", Stack("b", "c")), r"a Stack inside a Fuse is not a valid composition"),
    (Stack("a", Stack("b", "c")), r"a Stack inside a Stack"),
    (Parallel("a", Fuse("b", "c")), r"a Fuse inside a Parallel"),
    (Stack("a"), r"needs at least two children"),
    (Parallel("a", "a"), r"\['a'\] appear more than once"),
    (Average("a", "b", weights=[1.0]), r"weights: expected 2 non-negative"),
    ({"type": "Sum", "children": ["a", "b"]}, r"expected \{'type': one of"),
])
def test_nonsense_compositions_are_config_errors(block, message):
    with pytest.raises(ConfigError, match=message):
        CompositionConfig(block=block)


def test_fuse_over_missing_adapters_changes_nothing():
    model = two_adapters()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(TargetError, match=r"\['zzz'\] do not exist on the model"):
        model.add_adapter("comp", CompositionConfig(block=Fuse("a", "zzz")))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert "comp" not in model.peft_config


def test_children_that_accumulate_in_place_do_not_corrupt_the_running_output():
    """LoRA accumulates into the running output in place when autograd is off: Parallel / Average / Fuse
    must give each child its own copy, so the no-grad output equals the one computed with autograd."""
    from peftkit import LoraConfig

    torch.manual_seed(0)
    model = get_peft_model(FAM.model(), LoraConfig(r=2, target_modules=["output.dense"], init_lora_weights=False),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["output.dense"], init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 99, (2, 5))
    for block in (Parallel("a", "b"), Average("a", "b", weights=[1.0, 3.0]), Fuse("a", "b")):
        run_block(model, block)
        with torch.enable_grad():
            expected = model(input_ids=ids).logits.detach()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        model.delete_adapter("comp")
