"""PeftModel's public API behaves like Hugging Face PEFT's, and the hot path compiles without graph breaks."""

from __future__ import annotations

import inspect

import peft
import pytest
import torch

import peftkit
from peftkit import AdapterLayer, LoraConfig, PeftModel, get_peft_model

from .families import FAMILY


@pytest.fixture
def llama():
    return FAMILY["llama"]


API = [
    ("get_peft_model", None), ("inject_adapter_in_model", None), ("get_peft_model_state_dict", None),
    ("set_peft_model_state_dict", None), ("PeftModel", "from_pretrained"), ("PeftModel", "save_pretrained"),
    ("PeftModel", "load_adapter"), ("PeftModel", "add_adapter"), ("PeftModel", "set_adapter"),
    ("PeftModel", "delete_adapter"), ("PeftModel", "get_nb_trainable_parameters"),
    ("PeftModel", "set_requires_grad"), ("prepare_model_for_kbit_training", None),
    # peft serves these through PeftModel.__getattr__ from its LoRA tuner
    ("LoraModel", "merge_and_unload"), ("LoraModel", "merge_adapter"), ("LoraModel", "unload"),
]


@pytest.mark.parametrize(("name", "method"), API)
def test_signatures_accept_what_peft_accepts(name, method):
    ours, theirs = getattr(peftkit, name), getattr(peft, name)
    if method:
        ours = getattr(peftkit.PeftModel if name == "LoraModel" else ours, method)
        theirs = getattr(theirs, method)
    if not hasattr(theirs, "__call__"):
        pytest.fail(f"peft.{name}.{method} is not callable")
    ref = inspect.signature(theirs).parameters
    mine = inspect.signature(ours).parameters
    for pname, param in ref.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        assert pname in mine or any(p.kind == p.VAR_KEYWORD for p in mine.values()), f"{name}: missing {pname}"
        if pname in mine and param.default is not param.empty:
            assert mine[pname].default == param.default, f"{name}.{pname}: default differs"


def test_task_type_picks_the_subclass_and_trains_the_head():
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), LoraConfig(task_type="SEQ_CLS"))
    assert isinstance(model, peftkit.PeftModelForSequenceClassification)
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable


def test_adapters_add_set_delete(llama):
    model = get_peft_model(llama.model(), LoraConfig(r=2, init_lora_weights=False))
    base = llama.run(model.get_base_model())  # a reference before anything else
    model.add_adapter("b", LoraConfig(r=3, init_lora_weights=False, target_modules=["k_proj"]))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    out_default = llama.run(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".default." in n for n in trainable)
    model.set_adapter("b")
    out_b = llama.run(model)
    assert not torch.allclose(out_b, out_default)
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"]
    both = llama.run(model)
    assert not torch.allclose(both, out_b) and not torch.allclose(both, out_default)
    model.delete_adapter("b")
    assert set(model.peft_config) == {"default"} and model.active_adapters == ["default"]
    torch.testing.assert_close(llama.run(model), out_default, atol=0, rtol=0)
    assert not any(type(m).__name__ == "LoraAdapter" and m.r == 3 for m in model.modules())
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")
    del base


def test_disable_adapter_context(llama):
    base_out = llama.run(llama.model())
    model = get_peft_model(llama.model(), LoraConfig(init_lora_weights=False))
    with model.disable_adapter():
        torch.testing.assert_close(llama.run(model), base_out, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(llama.run(model), base_out, atol=1e-4)


def test_unload_returns_the_untouched_base(llama):
    base = llama.model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(init_lora_weights=False))
    plain = model.unload()
    assert plain is base and not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_print_trainable_parameters_matches_peft(llama, capsys):
    get_peft_model(llama.model(), LoraConfig()).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(llama.model(), peft.LoraConfig()).print_trainable_parameters()
    assert ours == capsys.readouterr().out


def test_generate_and_attributes_go_to_the_base_model(llama):
    base = llama.model()
    ids = torch.randint(0, 99, (1, 5))
    expected = base.generate(ids, max_new_tokens=4, do_sample=False)
    model = get_peft_model(base, LoraConfig())  # identity at init: same tokens
    assert model.config is base.config
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), expected)


def test_state_dict_helpers_round_trip(llama):
    a = get_peft_model(llama.model(), LoraConfig(init_lora_weights=False))
    b = get_peft_model(llama.model(seed=9), LoraConfig())
    state = peftkit.get_peft_model_state_dict(a)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in state)
    peftkit.set_peft_model_state_dict(b, state)
    b.get_base_model().load_state_dict(a.get_base_model().state_dict())
    torch.testing.assert_close(llama.run(b), llama.run(a), atol=0, rtol=0)


def test_inject_adapter_in_model_wraps_in_place(llama):
    base = llama.model()
    out = peftkit.inject_adapter_in_model(LoraConfig(r=2), base)
    assert out is base
    assert sum(isinstance(m, AdapterLayer) for m in base.modules()) == 4  # 2 layers x (q, v)


def test_bias_all_trains_every_bias():
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), LoraConfig(bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith(".bias")}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in biases
    assert "base_model.model.bert.encoder.layer.0.output.LayerNorm.bias" in biases
    ref = peft.get_peft_model(family.model(), peft.LoraConfig(bias="all"))
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_target_matching_nothing_lists_candidates(llama):
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(llama.model(), LoraConfig(target_modules=["nonexistent"]))


@pytest.mark.parametrize("dora", [False, True])
def test_forward_compiles_without_graph_breaks(dora):
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), LoraConfig(r=4, target_modules="all-linear", use_dora=dora))
    torch._dynamo.reset()
    model.train()
    explained = torch._dynamo.explain(model)(**family.inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    model.eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**family.inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


def test_from_pretrained_picks_task_class(tmp_path):
    family = FAMILY["bert"]
    get_peft_model(family.model(), LoraConfig(task_type="SEQ_CLS")).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(family.model(), tmp_path)
    assert isinstance(loaded, peftkit.PeftModelForSequenceClassification)
    assert loaded.training is False


def test_mixed_batch_routes_each_row_to_its_adapter(llama):
    model = get_peft_model(llama.model(), LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=3, init_lora_weights=False, target_modules=["q_proj", "k_proj"]))
    ids = torch.randint(0, 99, (3, 6))
    expected = []
    for name in ("default", "b"):
        model.set_adapter(name)
        expected.append(model(input_ids=ids).logits)
    with model.disable_adapter():
        expected.append(model(input_ids=ids).logits)
    model.set_adapter("default")
    mixed = model(input_ids=ids, adapter_names=["b", "__base__", "default"]).logits
    torch.testing.assert_close(mixed[0], expected[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], expected[2][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], expected[0][2], atol=1e-5, rtol=1e-5)
    assert all(layer.routing is None for _, layer in model.base_model.adapter_layers())
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, adapter_names=["nope", "b", "b"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=ids, adapter_names=["b", "b", "b"])


def test_generate_with_adapter_names(llama):
    base = llama.model()
    ids = torch.randint(0, 99, (2, 5))
    plain = base.generate(ids, max_new_tokens=3, do_sample=False)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False))
    routed = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, adapter_names=["__base__", "__base__"])
    assert torch.equal(routed, plain)
