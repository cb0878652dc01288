"""Last-k layer tuning: which blocks train, linear probing at k = 0, block stacks, and bad layer indices."""

from __future__ import annotations

import pytest
import torch

from peftkit import LastKConfig, PeftModel, SelectionError, get_peft_model, selection_summary
from peftkit.config import ConfigError
from peftkit.methods.selective import block_stacks

from ..families import FAMILY


def size(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_bert_last_block_and_head():
    family = FAMILY["bert"]
    base = family.model()
    model = get_peft_model(family.model(), LastKConfig(k=1, task_type="SEQ_CLS"))
    assert selection_summary(model) == {"selected": size(base.bert.encoder.layer[1]),
                                        "modules_to_save": size(base.classifier)}
    assert {n.split(".layer.")[1].split(".")[0] for n, _ in model.base_model.adapter_layers()} == {"1"}


def test_k_zero_is_linear_probing():
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), LastKConfig(k=0, task_type="SEQ_CLS"))
    assert not model.base_model.adapter_layers()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".classifier.modules_to_save." in n for n in trainable)


def test_k_zero_without_a_head_trains_nothing_and_says_so():
    with pytest.raises(SelectionError, match="linear probing"):
        get_peft_model(FAMILY["gpt2"].model(), LastKConfig(k=0))


def test_every_stack_of_an_encoder_decoder_trains_its_top_blocks():
    family = FAMILY["t5"]
    base = family.model()
    assert [p for p, _ in block_stacks(base)] == ["encoder.block", "decoder.block"]
    model = get_peft_model(family.model(), LastKConfig(k=1))
    assert selection_summary(model)["selected"] == size(base.encoder.block[1]) + size(base.decoder.block[1])


@pytest.mark.parametrize(("name", "stacks"), [
    ("llama", ["model.layers"]), ("gpt2", ["transformer.h"]), ("vit", ["vit.layers"]),  # transformers 5 (4.x: vit.encoder.layer)
    ("clip", ["text_model.encoder.layers", "vision_model.encoder.layers"]), ("unet", ["up_blocks"]),
])
def test_block_stacks_of_each_family(name, stacks):
    found = [p for p, _ in block_stacks(FAMILY[name].model())]
    assert found == stacks or (name == "vit" and found == ["vit.encoder.layer"])


def test_model_without_block_lists_counts_its_leaf_modules():
    family = FAMILY["convnet"]  # conv1, conv2, head
    model = get_peft_model(family.model(), LastKConfig(k=2))
    assert {n for n, _ in model.base_model.adapter_layers()} == {"conv2", "head"}


def test_explicit_layers_and_training_only_moves_them(tmp_path):
    family = FAMILY["llama"]
    model = get_peft_model(family.model(), LastKConfig(layers_to_transform=[0]))
    base = family.model()
    assert selection_summary(model)["selected"] == size(base.model.layers[0])
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        family.run(model).pow(2).mean().backward()
        opt.step()
    model.eval()
    tuned = family.run(model)
    with model.disable_adapter():
        assert torch.equal(family.run(model), family.run(base))
    assert torch.equal(family.run(model), tuned)
    model.save_pretrained(tmp_path)
    assert torch.equal(family.run(PeftModel.from_pretrained(family.model(), tmp_path)), tuned)
    plain = model.merge_and_unload().state_dict()
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, plain[k])}
    assert changed and all(k.startswith("model.layers.0.") for k in changed)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 3}, r"k=3: model.layers has only 2 layers"),
    ({"layers_to_transform": [1, 2]}, r"layer index 2 does not exist; model.layers has 2 layers \(0-1\)"),
    ({"layers_pattern": "blocks"}, "names no block list"),
])
def test_layers_that_do_not_exist_are_errors(kwargs, match):
    model = FAMILY["llama"].model()
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LastKConfig(**kwargs))
    assert not any(p.requires_grad is False for p in model.parameters())  # the model is left as it was


@pytest.mark.parametrize("kwargs", [{"k": -1}, {"k": 1.5}, {"layers_to_transform": [-1]}, {"layers_to_transform": "0"}])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError, match="LastKConfig"):
        LastKConfig(**kwargs)
