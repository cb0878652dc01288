"""LoRA on named parameters (``LoraConfig.target_parameters``, methods/lora/params.py) against peft 0.21.2's
``ParamWrapper`` on tiny Mixtral and Qwen3-MoE models (transformers 5: stacked expert parameters): outputs and
gradients, parameter counts, file keys, files both ways, merge / bit-exact unmerge, disable, delete, what
``"all-linear"`` targets on an MoE model, and bad input refused with the model left as it was."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import peftkit
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer, adapter_layers
from peftkit.methods.lora.params import ParamLayer

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.tensor([[3, 17, 42, 5, 88, 9, 61], [70, 2, 33, 14, 50, 26, 7]])


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def qwen3_moe() -> nn.Module:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=99, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                         num_experts=4, num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}
_BASES: dict[str, nn.Module] = {}


def base(name: str) -> nn.Module:
    """A fresh copy of the tiny model (built once per test session)."""
    if name not in _BASES:
        _BASES[name] = MODELS[name]()
    return copy.deepcopy(_BASES[name])


def perturb(theirs, ours, seed: int = 1, adapter: str = "default") -> None:
    """The same seeded non-zero LoRA weights in both (by file key)."""
    state = peft.get_peft_model_state_dict(theirs, adapter_name=adapter)
    gen = torch.Generator().manual_seed(seed)
    new = {k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in sorted(state.items())}
    peft.set_peft_model_state_dict(theirs, new, adapter_name=adapter)
    peftkit.set_peft_model_state_dict(ours, new, adapter_name=adapter)


def pair(name: str, **kw):
    cfg = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, **kw)
    theirs = peft.get_peft_model(base(name), peft.LoraConfig(**cfg))
    ours = peftkit.get_peft_model(base(name), peftkit.LoraConfig(**cfg))
    perturb(theirs, ours)
    return theirs, ours


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def grads_by_file_key(model, ours: bool) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA factors after a backward pass, keyed by file key."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS).logits
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    if ours:
        from peftkit.checkpoint import adapter_tensors
        return {k: v.grad for k, v in adapter_tensors(model.base_model, "default").items()}
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def base_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n and ".adapters." not in n}


# -- forward, gradients, counts, layout --------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_match_peft(name):
    theirs, ours = pair(name)
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base(name)), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-5)
    theirs.train(), ours.train()
    g_ref, g = grads_by_file_key(theirs, False), grads_by_file_key(ours, True)
    assert g.keys() == g_ref.keys() and len(g) == 8  # 2 layers x 2 stacks x (A, B)
    for key, grad in g.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grad, g_ref[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_layout_and_trainable_count_match_peft(name):
    theirs, ours = pair(name)
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    # peft's nesting: the first registered parameter (gate_up_proj) innermost
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight" in mine
    experts = ours.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamLayer) and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable, _ = ours.get_nb_trainable_parameters()
    stack = _BASES[name].model.layers[0].mlp.experts
    e, (o1, i1), (o2, i2) = stack.gate_up_proj.shape[0], stack.gate_up_proj.shape[1:], stack.down_proj.shape[1:]
    assert trainable == 2 * 2 * e * (o1 + i1 + o2 + i2)  # layers x r x experts x (d_out + d_in), both stacks


def test_transposed_stack_matches_peft():
    """A module that stores its stack (E, d_in, d_out) says ``is_transposed`` (as transformers' experts): peft's
    delta is then A^T B^T per expert."""

    class Experts(nn.Module):
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5, 7))

        def forward(self, x):  # x (E, n, 5)
            return torch.bmm(x, self.w).tanh()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return self.experts(x)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 4, 5)
    cfg = dict(r=2, target_modules=[], target_parameters=["experts.w"])
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**cfg))
    ours = peftkit.get_peft_model(copy.deepcopy(net), peftkit.LoraConfig(**cfg))
    state = {k: torch.randn(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, state)
    peftkit.set_peft_model_state_dict(ours, state)
    assert state["base_model.model.experts.lora_A.weight"].shape == (6, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(x), net(x), atol=1e-3)


# -- files both ways ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_peftkit_file_loads_in_peft(name, tmp_path):
    theirs, ours = pair(name)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(EXPERTS)
    loaded = peft.PeftModel.from_pretrained(base(name), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(loaded), logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_peft_file_loads_in_peftkit(name, tmp_path):
    theirs, _ = pair(name)
    theirs.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(base(name), tmp_path)
    assert sorted(loaded.peft_config["default"].target_parameters) == sorted(EXPERTS)
    torch.testing.assert_close(logits(loaded), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(loaded), logits(base(name)), atol=1e-3)


# -- merge, disable, delete --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_merge_then_unmerge_is_bit_exact(name):
    theirs, ours = pair(name)
    before = base_params(ours)
    adapted = logits(ours)
    ours.merge_adapter()
    merged_params = base_params(ours)
    assert any(not torch.equal(merged_params[k], before[k]) for k in before if "experts" in k)
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=1e-5)  # merged: the delta is in the weights
    ours.unmerge_adapter()
    after = base_params(ours)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # bit for bit
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=1e-5)
    theirs.merge_adapter()  # peft's merge gives the same weights
    torch.testing.assert_close(logits(theirs), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unload_gives_plain_model(name):
    theirs, ours = pair(name)
    expected = logits(theirs)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)
    ref = theirs.merge_and_unload()
    torch.testing.assert_close(plain.model.layers[1].mlp.experts.down_proj,
                               ref.model.layers[1].mlp.experts.down_proj, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_disable_gives_base_output(name):
    theirs, ours = pair(name)
    adapted, plain = logits(ours), logits(base(name))
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), plain, atol=0, rtol=0)
    torch.testing.assert_close(logits(ours), adapted, atol=0, rtol=0)
    ours.merge_adapter()
    with ours.disable_adapter():  # disabling a merged adapter unmerges it
        torch.testing.assert_close(logits(ours), plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_delete_restores_the_model(name):
    _, ours = pair(name)
    original = base(name)
    ours.delete_adapter("default")
    assert not adapter_layers(ours.base_model.model)
    assert type(ours.base_model.model.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(logits(ours), logits(original), atol=0, rtol=0)


def test_second_adapter_on_the_same_parameters():
    theirs, ours = pair("mixtral")
    cfg = dict(r=3, lora_alpha=3, target_modules=[], target_parameters=EXPERTS)
    theirs.add_adapter("other", peft.LoraConfig(**cfg))
    ours.add_adapter("other", peftkit.LoraConfig(**cfg))
    perturb(theirs, ours, seed=2, adapter="other")
    experts = ours.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamLayer) and not isinstance(experts.base_layer.base_layer, ParamLayer)
    assert set(experts.adapters) == set(experts.base_layer.adapters) == {"default", "other"}
    theirs.set_adapter("other"), ours.set_adapter("other")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="target_parameters"):
        ours.add_adapter("third", peftkit.LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))
    assert "third" not in ours.peft_config


# -- "all-linear" on an MoE model --------------------------------------------------------------------------------
def _peft_targets(model) -> set[str]:
    out = set()
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.ParamWrapper):
            out.add(f"{name.replace('.base_layer', '')}.{module.parameter_name}")
        elif isinstance(module, peft.tuners.lora.LoraLayer):
            out.add(name)
    return out


def _our_targets(model) -> set[str]:
    out = set()
    for path, layer in adapter_layers(model.base_model.model):
        out.add(f"{path.replace('.base_layer', '')}.{layer.parameter_name}" if isinstance(layer, ParamLayer)
                else path)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_all_linear_targets_what_peft_targets(name):
    theirs = peft.get_peft_model(base(name), peft.LoraConfig(r=2, target_modules="all-linear"))
    ours = peftkit.get_peft_model(base(name), peftkit.LoraConfig(r=2, target_modules="all-linear"))
    mine = _our_targets(ours)
    assert mine == _peft_targets(theirs)
    assert "model.layers.1.mlp.experts.gate_up_proj" in mine and "model.layers.1.mlp.gate.weight" in mine
    assert "model.layers.1.self_attn.q_proj" in mine and "lm_head" not in mine
    ref_cfg, cfg = theirs.peft_config["default"], ours.peft_config["default"]
    assert set(cfg.target_parameters) == set(ref_cfg.target_parameters) == {"gate.weight", "gate_up_proj",
                                                                           "down_proj"}
    assert cfg.rank_pattern == ref_cfg.rank_pattern == {r".*\.gate_up_proj": 4}
    ref, got = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    perturb(theirs, ours)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


def test_v4_expert_names_map_to_the_stacks_as_in_peft():
    cfg = dict(r=2, target_modules=["w1", "w3", "w2"])
    theirs = peft.get_peft_model(base("mixtral"), peft.LoraConfig(**cfg))
    ours = peftkit.get_peft_model(base("mixtral"), peftkit.LoraConfig(**cfg))
    assert _our_targets(ours) == _peft_targets(theirs) == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    with pytest.raises(ValueError, match="w3"):  # half of a fused stack
        peftkit.get_peft_model(base("mixtral"), peftkit.LoraConfig(r=2, target_modules=["w1"]))


# -- bad input ---------------------------------------------------------------------------------------------------
def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


@pytest.mark.parametrize("targets, match", [
    (["experts.no_such_param"], r"target_parameters: 'experts.no_such_param' matches no parameter.*expected"),
    (["experts.gate_up_proj", "experts.nope"], r"'experts.nope' matches no parameter"),
    (["input_layernorm.weight"], r"target_parameters: '.*input_layernorm.weight' has shape \(16,\).*2-D.*3-D"),
])
def test_bad_target_parameters_leave_the_model_untouched(targets, match):
    model = base("mixtral")
    model.model.layers[0].mlp.experts.down_proj.requires_grad_(False)  # a flag that must survive
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets))
    assert _snapshot(model) == before
    assert not any(isinstance(m, (AdapterLayer, ParamLayer)) for m in model.modules())


def test_unfactorable_stack_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.stack = nn.Parameter(torch.randn(2, 3, 4, 4))  # 4-D: no (experts, out, in) reading

        def forward(self, x):
            return self.lin(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Odd()

        def forward(self, x):
            return self.block(x)

    net = Net()
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"target_parameters: 'block.stack' has shape \(2, 3, 4, 4\).*3-D"):
        peftkit.get_peft_model(net, peftkit.LoraConfig(target_modules=["lin"], target_parameters=["block.stack"]))
    assert _snapshot(net) == before and type(net.block.lin) is nn.Linear


def test_config_checks():
    with pytest.raises(ConfigError, match="target_parameters"):
        peftkit.LoraConfig(target_parameters="experts.down_proj")  # a list, never a string (peft: TypeError)
    with pytest.raises(ValueError, match="lora_dropout"):
        peftkit.get_peft_model(base("mixtral"), peftkit.LoraConfig(target_modules=[], target_parameters=EXPERTS,
                                                                   lora_dropout=0.1))
    assert peftkit.LoraConfig(target_parameters=[]).target_parameters == []


def test_add_weighted_adapter_refuses_parameter_targets():
    _, ours = pair("mixtral")
    with pytest.raises(ValueError, match="target_parameters"):  # as peft
        ours.add_weighted_adapter(["default"], [1.0], "combined")
    assert "combined" not in ours.peft_config


@pytest.mark.parametrize("name", MODELS)
def test_all_linear_files_load_both_ways(name, tmp_path):
    theirs = peft.get_peft_model(base(name), peft.LoraConfig(r=2, target_modules="all-linear"))
    ours = peftkit.get_peft_model(base(name), peftkit.LoraConfig(r=2, target_modules="all-linear"))
    perturb(theirs, ours)
    expected = logits(theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(base(name), tmp_path / "ours")), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(peftkit.PeftModel.from_pretrained(base(name), tmp_path / "theirs")), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(peftkit.PeftModel.from_pretrained(base(name), tmp_path / "ours")), expected,
                               atol=1e-5, rtol=1e-5)
