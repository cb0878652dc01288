"""Hot-swapping as peft does it: rank padding (prepare_model_for_compiled_hotswap), adapters with fewer targets,
torch.compile without recompilation, peft's refusals; the same files swapped into peft and peftkit models
give the same outputs, and a swapped model gives the outputs of a fresh load."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.utils import hotswap as peft_hotswap
from safetensors.torch import load_file
from torch import nn

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.hotswap import (HotswapError, check_hotswap_configs_compatible, hotswap_adapter,
                             hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap)

from .families import FAMILY, V

IDS = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
QV = ["q_proj", "v_proj"]


def _base():
    return FAMILY["llama"].model()  # seeded: every call builds the same weights


def _save(tmp_path, name, seed, **kw):
    model = _base()
    torch.manual_seed(seed)
    kw.setdefault("target_modules", QV)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _fresh(folder):
    return _out(PeftModel.from_pretrained(_base(), folder))


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# (first adapter, second adapter, prepare_model_for_compiled_hotswap target rank or None / "no")
SCENARIOS = {
    "same rank, other alpha": (dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=3), None),
    "smaller rank, padded": (dict(r=8, lora_alpha=8), dict(r=4, lora_alpha=6), 8),
    "larger rank, first padded up": (dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=5), 8),
    "fewer targets": (dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=8, target_modules=["q_proj"]), 6),
    "larger rank, unprepared": (dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=5), "no"),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_outputs_as_peft_and_as_a_fresh_load(tmp_path, scenario):
    first_kw, second_kw, target_rank = SCENARIOS[scenario]
    first, second = _save(tmp_path, "first", 1, **first_kw), _save(tmp_path, "second", 2, **second_kw)
    ref = peft.PeftModel.from_pretrained(_base(), first)
    ours = PeftModel.from_pretrained(_base(), first)
    _close(_out(ours), _out(ref))
    if target_rank != "no":
        rank = {} if target_rank is None else {"target_rank": target_rank}
        peft_hotswap.prepare_model_for_compiled_hotswap(ref, **rank)
        prepare_model_for_compiled_hotswap(ours, **rank)
        _close(_out(ours), _out(ref))  # padding changes nothing
    peft_hotswap.hotswap_adapter(ref, str(second), adapter_name="default")
    hotswap_adapter(ours, second, adapter_name="default")
    expected = _fresh(second)
    _close(_out(ref), expected)
    _close(_out(ours), expected)
    # the swapped adapter saves to a file that loads back to the same outputs
    ours.save_pretrained(tmp_path / "resaved")
    _close(_fresh(tmp_path / "resaved"), expected)


def test_prepare_pads_ranks_and_updates_configs_as_peft(tmp_path):
    first = _save(tmp_path, "first", 1, r=4, lora_alpha=8, rank_pattern={"v_proj": 2})
    model = PeftModel.from_pretrained(_base(), first)
    before = _out(model)
    configs = {"default": LoraConfig(r=4, rank_pattern={"v_proj": 2})}
    prepare_model_for_compiled_hotswap(model, target_rank=6, config=configs)
    assert configs["default"].r == 6 and configs["default"].rank_pattern == {"v_proj": 6}
    layers = model.base_model.adapters("default")
    assert all(a.lora_A.shape[0] == 6 and a.lora_B.shape[1] == 6 and a.r == 6 for _, a in layers)
    assert all(isinstance(a.scaling, float) for _, a in model.base_model.adapters("default"))
    _close(_out(model), before, tol=0)
    with pytest.raises(ValueError, match="target rank 4, but .* has a larger rank \\(6\\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="before\\* compiling"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"))
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(get_peft_model(_base(), IA3Config()))


def test_state_dict_in_peft_model_layout(tmp_path):
    first, second = _save(tmp_path, "first", 1, r=4), _save(tmp_path, "second", 2, r=2, lora_alpha=3)
    model = PeftModel.from_pretrained(_base(), first)
    file = load_file(second / "adapter_model.safetensors")
    state = {k.replace(".weight", ".default.weight"): v for k, v in file.items()}  # peft's model layout
    hotswap_adapter_from_state_dict(model, state, "default", LoraConfig.from_pretrained(second))
    _close(_out(model), _fresh(second))


def test_compiled_model_swaps_without_recompiling(tmp_path, backend="eager"):
    first = _save(tmp_path, "first", 1, r=4, lora_alpha=8)
    swaps = [_save(tmp_path, "second", 2, r=8, lora_alpha=3, use_rslora=False),  # five adapters: other ranks,
             _save(tmp_path, "third", 3, r=2, lora_alpha=11, target_modules=["v_proj"]),  # alphas, targets
             _save(tmp_path, "fourth", 4, r=6, lora_alpha=6),
             _save(tmp_path, "fifth", 5, r=1, lora_alpha=0.5, target_modules=["q_proj"]),
             _save(tmp_path, "sixth", 6, r=3, lora_alpha=24, use_rslora=True)]
    model = PeftModel.from_pretrained(_base(), first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    _close(_out(compiled), _fresh(first), tol=1e-5 if backend == "inductor" else 1e-6)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for folder in swaps:
            hotswap_adapter(compiled, folder, adapter_name="default")
            _close(_out(compiled), _fresh(folder), tol=1e-5 if backend == "inductor" else 1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()


def test_dora_layers_the_file_lacks_become_the_base_layer(tmp_path):
    first = _save(tmp_path, "first", 1, r=4, use_dora=True)
    second = _save(tmp_path, "second", 2, r=4, use_dora=True, target_modules=["q_proj"])
    model = PeftModel.from_pretrained(_base(), first)
    hotswap_adapter(model, second)
    _close(_out(model), _fresh(second))


def _unchanged(model):
    state = {n: p.clone() for n, p in model.state_dict().items()}
    config = model.peft_config["default"].to_dict()
    return lambda: (all(torch.equal(state[n], p) for n, p in model.state_dict().items())
                    and model.peft_config["default"].to_dict() == config)


def test_refusals_leave_the_model_unchanged(tmp_path):
    first = _save(tmp_path, "first", 1, r=4)
    model = PeftModel.from_pretrained(_base(), first)
    ia3 = tmp_path / "ia3"
    get_peft_model(_base(), IA3Config()).save_pretrained(ia3)
    same = _unchanged(model)
    with pytest.raises(ValueError, match="incompatible PEFT types: .* holds a IA3 adapter but 'default' is LORA"):
        hotswap_adapter(model, ia3)
    assert same()
    with pytest.raises(HotswapError, match="keys only in the file .*k_proj") as err:  # more targets
        hotswap_adapter(model, _save(tmp_path, "more", 2, r=4, target_modules=["q_proj", "k_proj"]))
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)  # peft: RuntimeError
    assert same()
    with pytest.raises(ValueError, match="lora_dropout"):
        hotswap_adapter(model, _save(tmp_path, "dropout", 2, r=4, lora_dropout=0.1))
    model.merge_adapter()
    merged = _unchanged(model)
    with pytest.raises(ValueError, match="cannot hot-swap adapter 'default' because it is merged"):
        hotswap_adapter(model, _save(tmp_path, "second", 2, r=4))
    assert merged()
    model.unmerge_adapter()
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    prepared = _unchanged(model)
    with pytest.raises(HotswapError, match="rank 8 > the prepared rank 6"):
        hotswap_adapter(model, _save(tmp_path, "large", 2, r=8))
    assert prepared()


def test_peft_refuses_the_same_type_and_merge_errors(tmp_path):
    """The reference: peft raises ValueError for another PEFT type and for a merged target too."""
    first = _save(tmp_path, "first", 1, r=4)
    ref = peft.PeftModel.from_pretrained(_base(), first)
    ia3 = tmp_path / "ia3"
    get_peft_model(_base(), IA3Config()).save_pretrained(ia3)
    with pytest.raises(ValueError, match="Incompatible PEFT types"):
        peft_hotswap.hotswap_adapter(ref, str(ia3), adapter_name="default")
    ref.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft_hotswap.hotswap_adapter(ref, str(_save(tmp_path, "second", 2, r=4)), adapter_name="default")


@pytest.mark.parametrize(("kw0", "kw1"), [
    ({}, {}), ({}, {"r": 16, "lora_alpha": 3}), ({}, {"use_rslora": True}), ({}, {"lora_dropout": 0.1}),
    ({}, {"alpha_pattern": {"q": 2}}), ({}, {"use_dora": True}), ({}, "ia3"), ("ia3", "ia3"),
])
def test_check_hotswap_configs_compatible_as_peft(kw0, kw1):
    def configs(kw):
        if kw == "ia3":
            return IA3Config(), peft.IA3Config()
        return LoraConfig(**kw), peft.LoraConfig(**kw)

    (ours0, ref0), (ours1, ref1) = configs(kw0), configs(kw1)
    try:
        peft_hotswap.check_hotswap_configs_compatible(ref0, ref1)
        expected = None
    except ValueError as err:
        expected = str(err)
    if expected is None:
        check_hotswap_configs_compatible(ours0, ours1)
    else:
        with pytest.raises(ValueError) as err:
            check_hotswap_configs_compatible(ours0, ours1)
        assert str(err.value) == expected


def test_small_model_under_inductor():
    """A small non-transformers model: compile once with inductor, swap a padded rank and new alpha in."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.value = nn.Linear(12, 20), nn.Linear(20, 20, bias=False)

        def forward(self, x):
            return self.value(self.query(x).tanh())

    def build(r, alpha, seed):
        torch.manual_seed(0)
        net = Net().eval()
        torch.manual_seed(seed)
        return get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"],
                                              init_lora_weights=False))

    x = torch.randn(3, 12)
    model, other = build(2, 4, 1), build(5, 3, 2)
    prepare_model_for_compiled_hotswap(model, target_rank=5)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            hotswap_adapter_from_state_dict(compiled, get_peft_model_state_dict(other), "default",
                                            other.peft_config["default"])
            _close(compiled(x), other(x), tol=1e-5)
    torch._dynamo.reset()
