"""PeftMixedModel / get_peft_model(mixed=True): adapters of different types at once, nested in insertion order,
checked against Hugging Face peft's mixed model (outputs after seeded perturbation, trainable counts, merge,
unmerge, delete, load)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.mixed_model import MixedLayer

TARGETS = ["lin0", "lin1"]
KWARGS = {
    "lora": dict(r=4, lora_alpha=8),
    "loha": dict(r=4, alpha=4),
    "lokr": dict(r=4, alpha=4),
    "oft": dict(r=0, oft_block_size=4),
    "adalora": dict(init_r=4, target_r=2, total_step=10),
}
CONFIG = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig", "oft": "OFTConfig",
          "adalora": "AdaLoraConfig"}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 16)
        self.lin1 = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def configs(kind: str, **extra):
    kw = dict(KWARGS[kind], target_modules=list(TARGETS), **extra)
    return getattr(peft, CONFIG[kind])(**kw), getattr(peftkit, CONFIG[kind])(**kw)


def _stripped(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def copy_adapters(ref: nn.Module, ours: nn.Module) -> int:
    """peft's adapter tensors into ours ("lin0.lora_A.n0.weight" -> "lin0.adapters.n0.lora_A"); the count."""
    theirs = {_stripped(n): p for n, p in ref.named_parameters()}
    copied = 0
    with torch.no_grad():
        for path, layer in ours.base_model.adapter_layers():
            for name, adapter in layer.adapters.items():
                for pname, p in adapter.named_parameters():
                    key = next(k for k in (f"{path}.{pname}.{name}", f"{path}.{pname}.{name}.weight") if k in theirs)
                    p.copy_(theirs[key])
                    copied += 1
    return copied


def perturb(ref: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            stripped = _stripped(name)
            if ".ranknum." not in stripped and stripped not in ("lin0.weight", "lin0.bias", "lin1.weight", "lin1.bias"):
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def build(order: list[str], active: list[str] | None = None, seed: int = 0):
    """peft's and peftkit's mixed models with adapters n0, n1 ... of the kinds in ``order``, added in that order,
    all active (or ``active``), peft's perturbed and copied into ours."""
    torch.manual_seed(seed)
    base = Tiny()
    base_copy = copy.deepcopy(base)
    ref_cfg, our_cfg = configs(order[0])
    ref = peft.get_peft_model(base, ref_cfg, "n0", mixed=True)
    ours = peftkit.get_peft_model(base_copy, our_cfg, "n0", mixed=True)
    for i, kind in enumerate(order[1:], 1):
        ref_cfg, our_cfg = configs(kind)
        ref.add_adapter(f"n{i}", ref_cfg)
        ours.add_adapter(f"n{i}", our_cfg)
    names = active or [f"n{i}" for i in range(len(order))]
    ref.set_adapter(names)
    ours.set_adapter(names)
    perturb(ref, seed)
    assert copy_adapters(ref, ours) == sum(1 for n, p in ref.named_parameters() if p.requires_grad) or active
    return ref.eval(), ours.eval()


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))

ORDERS = [
    ["lora", "loha", "lokr", "oft"],
    ["oft", "lokr", "loha", "lora"],
    ["loha", "oft", "lora", "lokr"],
    ["lora", "oft", "loha", "adalora", "lokr"],
    ["oft", "oft", "lora", "oft", "loha", "loha"],
]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_outputs_equal_peft_mixed_model(order):
    ref, ours = build(order)
    plain = ours.base_model.model
    assert isinstance(plain.lin0, MixedLayer)
    with torch.no_grad():
        expected, got = ref(X), ours(X)
        with ours.disable_adapter():
            base_out = ours(X)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base_out).abs().max() > 1e-2  # the adapters do act


def test_order_matters_and_is_followed():
    """OFT then LoRA is not LoRA then OFT (the rotation acts on what it wraps); both follow peft."""
    a_ref, a_ours = build(["oft", "lora"])
    b_ref, b_ours = build(["lora", "oft"])
    with torch.no_grad():
        a, b = a_ours(X), b_ours(X)
        torch.testing.assert_close(a, a_ref(X), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, b_ref(X), atol=1e-5, rtol=1e-5)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("active", [["n1", "n0", "n3"], ["n3", "n1", "n0"], ["n2"], ["n4", "n0"]])
def test_active_subsets_and_list_order(active):
    """Two OFT adapters in one stage rotate in the order of the active list (as peft's OFT layer)."""
    ref, ours = build(["oft", "oft", "lora", "lokr", "oft"], active=active)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)
    assert ours.active_adapters == ref.active_adapters == active
    assert ours.active_adapter == ref.active_adapter


def test_trainable_counts_follow_peft():
    torch.manual_seed(0)
    base = Tiny()
    ours = peftkit.get_peft_model(copy.deepcopy(base), configs("lora")[1], "n0", mixed=True)
    ref = peft.get_peft_model(base, configs("lora")[0], "n0", mixed=True)
    lora = 4 * 16 + 16 * 4 + 4 * 16 + 8 * 4  # r (d_in + d_out) on lin0 and lin1
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters() == (lora, 408 + lora)
    for i, kind in enumerate(["loha", "oft", "lokr"], 1):
        ref.add_adapter(f"n{i}", configs(kind)[0])
        ours.add_adapter(f"n{i}", configs(kind)[1])
        assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
        assert ours.get_nb_trainable_parameters()[0] == lora  # added adapters stay frozen until activated
    loha = 2 * 4 * (16 + 16) + 2 * 4 * (16 + 8)
    oft = 2 * 4 * 6  # 4 blocks of 4 x 4 on each layer: 6 free entries each
    lokr = 4 * 4 + 4 * 4 + 2 * 4 + 4 * 4  # lin0: (4, 4) (x) (4, 4); lin1: (2, 4) (x) (4, 4)
    for names, inference_mode, expected in [
        (["n0", "n1", "n2", "n3"], False, lora + loha + oft + lokr),
        (["n2", "n1"], False, loha + oft),
        (["n2", "n1"], True, 0),
        ("n3", False, lokr),
    ]:
        ref.set_adapter(names, inference_mode=inference_mode)
        ours.set_adapter(names, inference_mode=inference_mode)
        assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
        assert ours.get_nb_trainable_parameters()[0] == expected
    ref.delete_adapter(["n3", "n0"])
    ours.delete_adapter(["n3", "n0"])
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert sorted(ours.peft_config) == sorted(ref.peft_config) == ["n1", "n2"]


def test_merge_equals_unmerged_and_unmerge_restores_bits():
    # the active list from the outermost in: merging in its order would merge the rotations first
    ref, ours = build(["lora", "oft", "loha", "adalora", "lokr", "oft"], active=["n5", "n4", "n3", "n2", "n1", "n0"])
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = ours(X)
        ours.merge_adapter()
        assert all(layer.merged for _, layer in ours.base_model.adapter_layers())
        torch.testing.assert_close(ours(X), unmerged, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    with torch.no_grad():
        torch.testing.assert_close(ours(X), unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("order", [ORDERS[0], ORDERS[2], ["oft", "lora", "oft"]], ids=["-".join(o) for o in
                                                                                          [ORDERS[0], ORDERS[2], ["oft", "lora", "oft"]]])
def test_merge_and_unload(order):
    ref, ours = build(order)
    with torch.no_grad():
        expected = ref(X)
        plain = ours.merge_and_unload()
    assert type(plain.lin0) is nn.Linear and type(plain.lin1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(X), expected, atol=1e-5, rtol=1e-5)
        if len(order) <= 2 or order in (ORDERS[0],):  # peft agrees where at most one rotation is nested around
            torch.testing.assert_close(ref.merge_and_unload()(X), expected, atol=1e-5, rtol=1e-5)


def test_unload_gives_back_the_base_model():
    torch.manual_seed(0)
    base = Tiny()
    original = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, configs("oft")[1], "n0", mixed=True)
    ours.add_adapter("n1", configs("lora")[1])
    ours.set_adapter(["n0", "n1"])
    perturb(ours)
    plain = ours.unload()
    assert type(plain.lin0) is nn.Linear
    for (n, p), (_, q) in zip(plain.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), n


def test_disable_adapter_gives_the_base_output():
    ref, ours = build(["loha", "oft", "lora"])
    with torch.no_grad():
        with ours.disable_adapter():
            got = ours(X)
        with ref.disable_adapter():
            expected = ref(X)
        base = ours.base_model.model.lin1.base_layer(torch.tanh(ours.base_model.model.lin0.base_layer(X)))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got, base)


def test_delete_adapter_follows_peft():
    ref, ours = build(["oft", "lora", "oft", "lokr"])
    for names in (["n1"], "n3"):
        ref.delete_adapter(names)
        ours.delete_adapter(names)
        assert sorted(ours.active_adapters) == sorted(ref.active_adapters)
        with torch.no_grad():
            torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)
    # the emptied LoRA stage stays between the two OFT ones, as peft's emptied layer: a new OFT adapter nests
    # outside the second one
    ref.add_adapter("n4", configs("oft")[0])
    ours.add_adapter("n4", configs("oft")[1])
    ref.set_adapter(["n4", "n2", "n0"])
    ours.set_adapter(["n4", "n2", "n0"])
    perturb(ref, seed=5)
    copy_adapters(ref, ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        ours.delete_adapter("nope")


@pytest.mark.parametrize("make", [
    lambda: peftkit.IA3Config(target_modules=TARGETS, feedforward_modules=[]),
    lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    lambda: peftkit.BOFTConfig(boft_block_size=4, target_modules=TARGETS),
    lambda: peftkit.VeraConfig(r=4, target_modules=TARGETS),
])
def test_other_types_are_refused(make):
    torch.manual_seed(0)
    base = Tiny()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        peftkit.get_peft_model(base, make(), mixed=True)
    ours = peftkit.get_peft_model(base, configs("lora")[1], "n0", mixed=True)
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        ours.add_adapter("other", make())
    assert list(ours.peft_config) == ["n0"]
    assert list(ours.unload().state_dict()) == list(before)


def test_ia3_refused_by_peft_too():
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        peft.get_peft_model(Tiny(), peft.IA3Config(target_modules=TARGETS, feedforward_modules=[]), mixed=True)


def test_from_pretrained_and_load_adapter_each_from_its_folder(tmp_path):
    """Adapters saved by plain PeftModels (peft's), loaded one folder each into both mixed models."""
    torch.manual_seed(0)
    base = Tiny()
    kinds = ["lokr", "oft", "lora", "loha"]
    for i, kind in enumerate(kinds):
        single = peft.get_peft_model(copy.deepcopy(base), configs(kind)[0])
        perturb(single, seed=10 + i)
        single.save_pretrained(tmp_path / kind)
    ref = peft.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / kinds[0], "n0")
    ours = peftkit.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / kinds[0], "n0")
    for i, kind in enumerate(kinds[1:], 1):
        ref.load_adapter(tmp_path / kind, f"n{i}")
        ours.load_adapter(tmp_path / kind, f"n{i}")
        assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    names = [f"n{i}" for i in range(len(kinds))]
    ref.set_adapter(names)
    ours.set_adapter(names)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    with torch.no_grad():
        expected = ref(X)
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        ours.add_adapter("n1", configs("lora")[1])
    # a folder of another type is refused and changes nothing
    ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=TARGETS, feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="not compatible"):
        ours.load_adapter(tmp_path / "ia3", "n9")
    with pytest.raises(ValueError, match="not supported for mixed models"):
        peftkit.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / "ia3")
    assert list(ours.peft_config) == names
    with torch.no_grad():
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-5)


def test_what_peft_does_not_support_either(tmp_path):
    _, ours = build(["lora", "loha"])
    with pytest.raises(NotImplementedError, match="Saving is not supported"):
        ours.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="get_layer_status"):
        ours.get_layer_status()
    with pytest.raises(TypeError, match="get_model_status"):
        ours.get_model_status()
    with pytest.raises(NotImplementedError, match="Weighted adapters"):
        ours.add_weighted_adapter(["n0"], [1.0], "w")
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['zz'\] not found"):
        ours.set_adapter(["n0", "zz"])


def test_served_as_peft_names():
    from peftkit.compat.facade import FACADES
    assert FACADES["peft.mixed_model"]["PeftMixedModel"] is peftkit.PeftMixedModel
    assert FACADES["peft.tuners.mixed"]["COMPATIBLE_TUNER_TYPES"] == ("LORA", "LOHA", "LOKR", "ADALORA", "OFT")


def test_gradients_equal_peft():
    ref, ours = build(["loha", "oft", "lora", "adalora", "lokr"])
    ref.train()
    ours.train()
    weights = torch.linspace(-1, 2, 8)
    x_ref, x_ours = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    (ref(x_ref) * weights).sum().backward()
    (ours(x_ours) * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    theirs = {_stripped(n): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    compared = 0
    for path, layer in ours.base_model.adapter_layers():
        for name, adapter in layer.adapters.items():
            for pname, p in adapter.named_parameters():
                key = next(k for k in (f"{path}.{pname}.{name}", f"{path}.{pname}.{name}.weight") if k in theirs)
                torch.testing.assert_close(p.grad, theirs[key], atol=1e-5, rtol=1e-5, msg=key)
                compared += 1
    assert compared == len(theirs) == 2 * (2 + 4 + 1 + 3 + 2)


def test_merge_adapter_differs_from_peft_where_peft_merges_outer_first():
    """peft's merge_adapter merges the nested layers outermost first, so with a rotation nested with another
    adapter its merged model computes something else than its unmerged one; ours merges innermost first."""
    ref, ours = build(["lora", "oft"])
    with torch.no_grad():
        expected = ref(X)
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-5)
        ours.merge_adapter()
        ref.merge_adapter()
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-5)
        assert (ref(X) - expected).abs().max() > 1e-2  # peft 0.21.2
