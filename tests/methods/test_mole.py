"""MoLE: the gated sum of LoRA experts against its formula, experts from peft's and peftkit's folders, only the gate
training, the balance loss against its definition, merging with an input-independent gate, files, bad input."""

from __future__ import annotations

import math
import os
import shutil

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit import AdapterLayer
from peftkit.config import ConfigError
from peftkit.methods.mole import MoleAdapter, MoleConfig
from peftkit.methods.mole import functional as MF

from ..families import FAMILY

TARGETS = ["q_proj", "v_proj"]


@torch.no_grad()
def _nudge(model, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n or ".adapters." in n:
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two LoRA experts of the tiny Llama: one written by peft (r=2, alpha=4), one by peftkit (r=3, rsLoRA)."""
    root = tmp_path_factory.mktemp("experts")
    llama = FAMILY["llama"]
    a = peft.get_peft_model(llama.model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    _nudge(a, seed=1)
    a.save_pretrained(root / "a")
    b = peftkit.get_peft_model(llama.model(), peftkit.LoraConfig(r=3, lora_alpha=6, use_rslora=True,
                                                                 target_modules=TARGETS))
    _nudge(b, seed=2)
    b.save_pretrained(root / "b")
    return {"a": str(root / "a"), "b": str(root / "b")}


def _experts_on_disk(folders, path):
    """(A, B, s) of each expert at ``path``, read straight from the folders' files."""
    out = []
    for folder, s in ((folders["a"], 4 / 2), (folders["b"], 6 / math.sqrt(3))):
        state = load_file(os.path.join(folder, "adapter_model.safetensors"))
        out.append((state[f"base_model.model.{path}.lora_A.weight"], state[f"base_model.model.{path}.lora_B.weight"], s))
    return out


def test_config_from_folders_and_bad_values(folders):
    config = MoleConfig.from_lora_folders(folders, temperature=0.5)
    assert (config.num_experts, config.r, config.lora_alpha, config.use_rslora) == (2, [2, 3], [4, 6], [False, True])
    assert sorted(config.target_modules) == TARGETS
    assert config.expert_scale(1) == 6 / math.sqrt(3)
    defaults = MoleConfig()
    assert (defaults.num_experts, defaults.temperature, defaults.gate_input, defaults.train_experts) == (2, 1.0, True,
                                                                                                          False)
    for bad, field in [({"num_experts": 0}, "num_experts"), ({"r": [2, 2, 2]}, "r"), ({"r": 0}, "r"),
                       ({"lora_alpha": [1, -1]}, "lora_alpha"), ({"use_rslora": "yes"}, "use_rslora"),
                       ({"temperature": 0}, "temperature"), ({"fixed_weights": [1.0]}, "fixed_weights"),
                       ({"balance_loss_weight": -1}, "balance_loss_weight"), ({"adapters": {}}, "adapters"),
                       ({"adapters": {"a": "x"}, "num_experts": 2}, "num_experts"),
                       ({"gate_input": 1}, "gate_input"), ({"lora_dropout": 1.5}, "lora_dropout")]:
        with pytest.raises(ConfigError, match=field):
            MoleConfig(**bad)


def test_output_is_the_gated_sum_of_the_experts(folders):
    """Layer output == W0 x + sum_i g_i(x) B_i A_i x s_i, g = softmax((W_g x + b_g) / tau), tensors from the files."""
    model = peftkit.get_peft_model(FAMILY["llama"].model(), MoleConfig.from_lora_folders(folders, temperature=0.7))
    layers = dict(model.base_model.adapter_layers())
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS)
    _nudge(model, seed=3)  # the gate (zero at the start) and, harmlessly, the frozen experts' copies
    path = "model.layers.1.self_attn.v_proj"
    layer = layers[path]
    adapter = layer.adapters["default"]
    # the experts hold the folders' tensors: restore them (the nudge moved them) and check they load as saved
    experts = _experts_on_disk(folders, path)
    with torch.no_grad():
        for i, (A, B, _) in enumerate(experts):
            getattr(adapter, f"lora_A_{i}").copy_(A)
            getattr(adapter, f"lora_B_{i}").copy_(B)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = layer(x)
        g = torch.softmax((x @ adapter.gate_weight.t() + adapter.gate_bias) / 0.7, dim=-1)
        want = layer.base_layer(x)
        for i, (A, B, s) in enumerate(experts):
            want = want + g[..., i : i + 1] * (x @ A.t() @ B.t()) * s
    assert g.std() > 0.01  # the gate differs between experts and tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the batched GEMM form equals the term-by-term formula
    As, Bs, ss = zip(*experts)
    torch.testing.assert_close(MF.mixture(x, list(As), list(Bs), list(ss), g),
                               MF.mixture_reference(x, As, Bs, ss, g), atol=1e-6, rtol=1e-5)


def test_only_the_gate_trains(folders):
    model = peftkit.get_peft_model(FAMILY["llama"].model(), MoleConfig.from_lora_folders(folders))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("gate_weight", "gate_bias")) for n in trainable)
    # 4 layers x N (d_in + 1), N = 2, d_in = 32
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * 33
    model.train()
    model(input_ids=torch.randint(0, 64, (2, 6))).logits.pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    # with train_experts the experts train too: + sum_i r_i (d_in + d_out) per layer
    both = peftkit.get_peft_model(FAMILY["llama"].model(), MoleConfig.from_lora_folders(folders, train_experts=True))
    dims = [(layer.base_layer.in_features, layer.base_layer.out_features) for _, layer in both.base_model.adapter_layers()]
    assert both.get_nb_trainable_parameters()[0] == sum(2 * (i + 1) + (2 + 3) * (i + o) for i, o in dims)


def test_balance_loss_equals_its_definition(folders):
    torch.manual_seed(0)
    config = MoleConfig.from_lora_folders(folders, temperature=2.0, balance_loss_weight=0.25)
    model = peftkit.get_peft_model(FAMILY["llama"].model(), config)
    _nudge(model, scale=1.0, seed=4)
    model.train()
    inputs = {}
    layers = dict(model.base_model.adapter_layers())
    hooks = [layer.register_forward_pre_hook(lambda m, a, p=path: inputs.__setitem__(p, a[0]))
             for path, layer in layers.items()]
    ids = torch.randint(0, 64, (2, 6))
    out = model(input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    # q_i = mean over the M = 4 layers of the gate value g_i averaged over the batch's tokens
    q = torch.stack([torch.softmax((inputs[p] @ layers[p].adapters["default"].gate_weight.t()
                                    + layers[p].adapters["default"].gate_bias) / 2.0, -1).reshape(-1, 2).mean(0)
                     for p in layers]).mean(0)
    balance = -torch.log(q[0] * q[1])
    task = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + 0.25 * balance, atol=1e-5, rtol=1e-5)
    assert balance > 2 * math.log(2) + 1e-4  # the nudged gate is not balanced
    # the term reaches the gate's gradient: d(loss)/d(gate) differs from the task loss's alone
    out.loss.backward()
    g_total = layers["model.layers.0.self_attn.q_proj"].adapters["default"].gate_bias.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids).logits  # the task loss alone
    task_only = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    task_only.backward()
    assert not torch.allclose(g_total, layers["model.layers.0.self_attn.q_proj"].adapters["default"].gate_bias.grad)


@pytest.mark.parametrize("family,targets", [("llama", TARGETS), ("gpt2", ["c_attn"])])
@pytest.mark.parametrize("fixed", [False, True])
def test_input_independent_gate_merges_bit_exact(family, targets, fixed):
    fam = FAMILY[family]
    extra = {"fixed_weights": [0.5, -0.25, 1.5]} if fixed else {"gate_input": False}
    model = peftkit.get_peft_model(fam.model(), MoleConfig(num_experts=3, r=[2, 1, 3], lora_alpha=4,
                                                           target_modules=targets, **extra))
    _nudge(model, seed=6)
    path, layer = model.base_model.adapter_layers()[0]
    adapter = layer.adapters["default"]
    w = torch.tensor(extra["fixed_weights"]) if fixed else torch.softmax(adapter.gate_logits.detach(), -1)
    want = sum(w[i] * adapter.scales[i] * (getattr(adapter, f"lora_B_{i}") @ getattr(adapter, f"lora_A_{i}"))
               for i in range(3)).detach()
    if family == "gpt2":
        want = want.t()  # Conv1D stores (d_in, d_out)
    torch.testing.assert_close(adapter.delta_weight(layer.base_layer), want, atol=1e-6, rtol=1e-6)
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    with torch.no_grad():
        unmerged = fam.run(model)
        model.merge_adapter()
        torch.testing.assert_close(fam.run(model), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    expected = 0 if fixed else 3
    assert model.get_nb_trainable_parameters()[0] == expected * len(model.base_model.adapter_layers())


def test_input_dependent_gate_refuses_merge():
    model = peftkit.get_peft_model(FAMILY["llama"].model(), MoleConfig(target_modules=TARGETS))
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="gate_input"):
        model.merge_adapter()
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.weight, weight)
    assert not any(layer.merged_adapters for _, layer in model.base_model.adapter_layers())


def test_files_hold_the_experts_and_load_without_the_folders(folders, tmp_path):
    copies = {k: shutil.copytree(v, tmp_path / k) for k, v in folders.items()}
    model = peftkit.get_peft_model(FAMILY["llama"].model(), MoleConfig.from_lora_folders(copies))
    _nudge(model, seed=7)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "mole")
    keys = set(load_file(tmp_path / "mole" / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {f"{p}.mole_experts.0.lora_A.weight", f"{p}.mole_experts.1.lora_B.weight", f"{p}.mole_gate.weight",
            f"{p}.mole_gate.bias"} <= keys and len(keys) == 4 * 6
    for folder in copies.values():
        shutil.rmtree(folder)
    loaded = peftkit.PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path / "mole")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_bad_experts_and_layers_leave_the_model_untouched(folders, tmp_path):
    ia3 = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.IA3Config(target_modules=TARGETS,
                                                                            feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    model = FAMILY["llama"].model()
    with pytest.raises(ValueError, match=r"MoleConfig.adapters\['x'\].*LoRA"):
        peftkit.get_peft_model(model, MoleConfig(adapters={"x": str(tmp_path / "ia3")}, target_modules=TARGETS))
    # an expert on other modules than the config's targets
    config = MoleConfig.from_lora_folders(folders)
    config.target_modules = ["q_proj"]
    with pytest.raises(ValueError, match=r"MoleConfig.adapters\['a'\].*v_proj"):
        peftkit.get_peft_model(model, config)
    conv = FAMILY["convnet"].model()
    with pytest.raises(Exception, match="conv1"):
        peftkit.get_peft_model(conv, MoleConfig(target_modules=["conv1"]))
    for m in (model, conv):
        assert not any(isinstance(mod, AdapterLayer) for mod in m.modules())
    assert isinstance(MoleAdapter.param_count(torch.nn.Linear(8, 4), MoleConfig(num_experts=3)), int)
