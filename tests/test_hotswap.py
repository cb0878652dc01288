"""hotswap_adapter: in-place weight replacement gives the outputs of a fresh load, and refuses what does not fit."""

from __future__ import annotations

import pytest
import torch

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.hotswap import hotswap_adapter

from .families import FAMILY, V

IDS = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))


def _save(tmp_path, name, config, seed):
    torch.manual_seed(seed)
    model = get_peft_model(FAMILY["llama"].model(), config)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _params(model):
    return {n: (p, p.data_ptr()) for n, p in model.named_parameters()}


def test_same_rank_equals_fresh_load_and_keeps_the_parameters(tmp_path):
    first = _save(tmp_path, "first", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), 1)
    second = _save(tmp_path, "second", LoraConfig(r=4, lora_alpha=3, init_lora_weights=False), 2)
    model = PeftModel.from_pretrained(FAMILY["llama"].model(), first)
    before, params = _out(model), _params(model)
    hotswap_adapter(model, second, adapter_name="default")
    fresh = PeftModel.from_pretrained(FAMILY["llama"].model(), second)
    after = _out(model)
    torch.testing.assert_close(after, _out(fresh), atol=0, rtol=0)
    assert (after - before).abs().max() > 1e-3
    assert {n: (p, ptr) for n, (p, ptr) in params.items()} == _params(model)  # same tensors, same storage
    assert model.peft_config["default"].lora_alpha == 3


def test_smaller_ranks_are_zero_padded(tmp_path):
    first = _save(tmp_path, "first", LoraConfig(r=8, init_lora_weights=False), 1)
    second = _save(tmp_path, "second", LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5.0},
        init_lora_weights=False), 2)
    model = PeftModel.from_pretrained(FAMILY["llama"].model(), first)
    with torch.no_grad():  # the mixed-batch cache must follow the swap too
        model(input_ids=IDS, adapter_names=["default", "__base__"])
    hotswap_adapter(model, second)
    expected = _out(PeftModel.from_pretrained(FAMILY["llama"].model(), second))
    torch.testing.assert_close(_out(model), expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], expected[0], atol=1e-5, rtol=1e-5)
    assert all(a.lora_A.shape[0] == 8 for _, a in model.base_model.adapters("default"))
    model.save_pretrained(tmp_path / "resaved")  # padded shapes, config patterns keep the scaling
    again = PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path / "resaved")
    torch.testing.assert_close(_out(again), expected, atol=1e-6, rtol=1e-6)


def test_larger_ranks_grow_the_parameters_in_place(tmp_path):
    # peft swaps the tensors of an unprepared model; after prepare_model_for_compiled_hotswap the target rank
    # is a limit (tests/test_hotswap_parity.py)
    first = _save(tmp_path, "first", LoraConfig(r=4, init_lora_weights=False), 1)
    second = _save(tmp_path, "second", LoraConfig(r=8, lora_alpha=5, init_lora_weights=False), 2)
    model = PeftModel.from_pretrained(FAMILY["llama"].model(), first)
    params = dict(model.named_parameters())
    hotswap_adapter(model, second)
    torch.testing.assert_close(_out(model), _out(PeftModel.from_pretrained(FAMILY["llama"].model(), second)),
                               atol=1e-6, rtol=1e-6)
    assert all(params[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    assert all(a.lora_A.shape[0] == 8 and a.r == 8 for _, a in model.base_model.adapters("default"))


def test_ia3_swaps_too(tmp_path):
    first = _save(tmp_path, "first", IA3Config(init_ia3_weights=False), 1)
    second = _save(tmp_path, "second", IA3Config(init_ia3_weights=False), 2)
    model = PeftModel.from_pretrained(FAMILY["llama"].model(), first)
    hotswap_adapter(model, second)
    torch.testing.assert_close(_out(model), _out(PeftModel.from_pretrained(FAMILY["llama"].model(), second)),
                               atol=0, rtol=0)


@pytest.mark.parametrize(("config", "match"), [
    (LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False),
     r"does not target the same modules as 'default': keys only in the file \['base_model\.model\.model\.layers\.0\.self_attn\.k_proj"),
    (IA3Config(), r"holds a IA3 adapter but 'default' is LORA"),
    (LoraConfig(r=4, use_dora=True), "use_dora differs"),
])
def test_bad_swaps_raise_and_leave_the_model_unchanged(tmp_path, config, match):
    first = _save(tmp_path, "first", LoraConfig(r=4, init_lora_weights=False), 1)
    bad = _save(tmp_path, "bad", config, 2)
    model = PeftModel.from_pretrained(FAMILY["llama"].model(), first)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    config_before = model.peft_config["default"].to_dict()
    with pytest.raises(ValueError, match=match):
        hotswap_adapter(model, bad)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert model.peft_config["default"].to_dict() == config_before
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        hotswap_adapter(model, first, adapter_name="other")
