"""Conv3d (LoRA, DoRA, (IA)3, LoHa, LoKr) and grouped convolutions (LoRA, DoRA), against Hugging Face PEFT.

Where PEFT supports the layer (LoRA / DoRA / (IA)3 on Conv3d, LoRA / DoRA on grouped Conv1d/2d/3d): the same
trainable-parameter count, file keys and shapes, outputs and gradients (<= 1e-5) after loading the same
(seeded, perturbed) weights in either direction, and the same merge (grouped LoRA: refused, as PEFT).
PEFT 0.21 has no Conv3d LoHa / LoKr: there the layout is PEFT's Conv2d one with a third kernel axis, checked
against PEFT's Conv2d numerics through a depth-1 kernel and against the delta written out by hand.
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.lora.layer import LoraAdapter

from ..families import Family
from ..parity import assert_loads_both_ways, assert_merges_like_peft, assert_same_trainable_state, perturb

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Video(nn.Module):
    """A strided 3x3x3 stem and a (3, 1, 3) mixing convolution (grouped, with or without bias)."""

    def __init__(self, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1)
        self.mix = nn.Conv3d(8, 8, (3, 1, 3), padding=(1, 0, 1), groups=groups, bias=bias)

    def forward(self, x):
        return self.mix(self.stem(x).tanh())


class Grouped(nn.Module):
    """One grouped convolution of 1, 2 or 3 spatial dimensions (8 -> 12 channels, kernel 3, stride 2)."""

    def __init__(self, dim: int, groups: int, bias: bool) -> None:
        super().__init__()
        self.conv = CONV[dim](8, 12, 3, stride=2, padding=1, groups=groups, bias=bias)

    def forward(self, x):
        return self.conv(x)


def video(groups: int = 1, bias: bool = True) -> Family:
    return Family("video", lambda: Video(groups, bias), lambda: {"x": torch.randn(2, 3, 4, 6, 6)}, lambda o: o,
                  targets=["stem", "mix"])


def grouped(dim: int, groups: int, bias: bool) -> Family:
    shape = (2, 8) + (7, 6, 5)[:dim]
    return Family("grouped", lambda: Grouped(dim, groups, bias), lambda: {"x": torch.randn(shape)}, lambda o: o,
                  targets=["conv"])


def _perturb(model: nn.Module, family: Family) -> None:
    perturb(model, scale=0.2, seed=3)


def _grad_name(name: str) -> str:
    """peft "...mix.lora_A.default.weight" and peftkit "...mix.adapters.default.lora_A" -> "...mix.lora_A"."""
    name = name.replace(".adapters.default", "").replace(".default", "").removesuffix(".weight")
    return name.replace(".magnitude", ".lora_magnitude_vector")


def _grads(model: nn.Module, family: Family) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    y = family.run(model)
    (y * torch.linspace(-1, 2, y.shape[1]).reshape(1, -1, *([1] * (y.dim() - 2)))).sum().backward()
    return y.detach(), {_grad_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def check_against_peft(family: Family, ref_cfg, our_cfg, tmp_path, merge: bool = True) -> None:
    theirs = peft.get_peft_model(family.model(), ref_cfg)
    ours = peftkit.get_peft_model(family.model(), our_cfg)
    assert_same_trainable_state(theirs, ours)  # parameter count, file keys and shapes
    mine, _ = assert_loads_both_ways(family, ref_cfg, our_cfg, tmp_path, train=_perturb)
    loaded = peft.PeftModel.from_pretrained(family.model(), tmp_path / "peftkit", is_trainable=True)
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peftkit" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}

    # gradients: the same for every adapter tensor, and nothing reaches the base
    mine.train(), loaded.train()
    y, g = _grads(mine, family)
    y_ref, g_ref = _grads(loaded, family)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert g.keys() == g_ref.keys() and g
    for key, grad in g.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grad, g_ref[key], atol=1e-5, rtol=1e-5, msg=key)
    base = [n for n, p in mine.named_parameters() if ".adapters." not in n]
    assert base and all(not dict(mine.named_parameters())[n].requires_grad for n in base)
    mine.eval(), loaded.eval()

    theirs = peft.PeftModel.from_pretrained(family.model(), tmp_path / "peftkit")
    if merge:
        assert_merges_like_peft(family, theirs, mine)
    else:  # PEFT refuses to merge LoRA into a grouped convolution; so do we, leaving the model as it was
        before = {k: v.clone() for k, v in mine.state_dict().items()}
        out = family.run(mine)
        with pytest.raises(NotImplementedError, match="groups > 1"):
            theirs.merge_adapter()
        with pytest.raises(NotImplementedError, match="grouped convolution"):
            mine.merge_adapter()
        assert all(torch.equal(before[k], v) for k, v in mine.state_dict().items())
        assert not any(layer.merged for _, layer in mine.base_model.adapter_layers())
        torch.testing.assert_close(family.run(mine), out, atol=0, rtol=0)


# -- Conv3d ------------------------------------------------------------------------------------------------
LORA_CASES = {
    "lora": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_conv3d_matches_peft(case, tmp_path):
    family = video()
    kwargs = {**LORA_CASES[case], "target_modules": family.targets}
    check_against_peft(family, peft.LoraConfig(**kwargs), peftkit.LoraConfig(**kwargs), tmp_path)


def test_dora_conv3d_magnitude_layout():
    ours = peftkit.get_peft_model(video().model(), peftkit.LoraConfig(r=4, target_modules=["mix"], use_dora=True))
    state = peftkit.get_peft_model_state_dict(ours)
    magnitude = state["base_model.model.mix.lora_magnitude_vector"]
    assert magnitude.shape == (1, 8, 1, 1, 1)
    w = ours.base_model.model.mix.base_layer.weight
    torch.testing.assert_close(magnitude.reshape(-1), w.flatten(1).norm(dim=1))  # B = 0: ||W0|| per channel


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_ia3_conv3d_matches_peft(feedforward, groups, tmp_path):
    family = video(groups=groups)
    kwargs = {"target_modules": family.targets, "feedforward_modules": ["mix"] if feedforward else []}
    check_against_peft(family, peft.IA3Config(**kwargs), peftkit.IA3Config(**kwargs), tmp_path)


# -- grouped convolutions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_lora_grouped_matches_peft(dim, groups, bias, tmp_path):
    family = grouped(dim, groups, bias)
    kwargs = {"r": 8, "lora_alpha": 4, "target_modules": family.targets}
    check_against_peft(family, peft.LoraConfig(**kwargs), peftkit.LoraConfig(**kwargs), tmp_path, merge=False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dim", "groups"), [(1, 2), (2, 4), (3, 2)])
def test_dora_grouped_matches_peft(dim, groups, bias, tmp_path):
    family = grouped(dim, groups, bias)
    kwargs = {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": family.targets}
    check_against_peft(family, peft.LoraConfig(**kwargs), peftkit.LoraConfig(**kwargs), tmp_path, merge=False)


def test_lora_grouped_video_matches_peft(tmp_path):
    family = video(groups=4, bias=False)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["mix"]}
    check_against_peft(family, peft.LoraConfig(**kwargs), peftkit.LoraConfig(**kwargs), tmp_path, merge=False)


def test_grouped_merge_refusal_keeps_outputs():
    """With an ungrouped layer targeted too, merging stops at the grouped one (layer by layer, as PEFT): the
    layers merged so far stay merged, the outputs do not change, and unmerging restores the base exactly."""
    family = video(groups=4)
    model = peftkit.get_peft_model(family.model(), peftkit.LoraConfig(r=4, target_modules=["stem", "mix"]))
    perturb(model, scale=0.2, seed=3)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    out = family.run(model)
    with pytest.raises(NotImplementedError, match="grouped convolution"):
        model.merge_adapter()
    torch.testing.assert_close(family.run(model), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(before[k], v) for k, v in model.get_base_model().state_dict().items())
    torch.testing.assert_close(family.run(model), out, atol=0, rtol=0)


def test_grouped_layout_and_forward_by_hand():
    base = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    adapter = LoraAdapter(base, peftkit.LoraConfig(r=8, lora_alpha=4, init_lora_weights=False), "conv")
    assert adapter.lora_A.shape == (8, 8, 3, 3) and adapter.lora_B.shape == (12, 2, 1, 1)
    assert LoraAdapter.param_count(base, peftkit.LoraConfig(r=8)) == 8 * 8 * 9 + 12 * 2
    x = torch.randn(2, 8, 5, 5)
    h = torch.nn.functional.conv2d(x, adapter.lora_A, padding=1)
    # output channel o of group g = o // 3 reads A's output channels 2g, 2g + 1
    lora = torch.stack([torch.einsum("nrhw,r->nhw", h[:, 2 * (o // 3): 2 * (o // 3) + 2],
                                     adapter.lora_B[o, :, 0, 0]) for o in range(12)], 1)
    torch.testing.assert_close(adapter(base, x, base(x)), base(x) + 0.5 * lora, atol=1e-5, rtol=1e-5)


def test_grouped_rank_must_divide_groups():
    base = nn.Conv2d(8, 8, 3, groups=4)
    with pytest.raises(ValueError, match="divisible by groups"):
        LoraAdapter(base, peftkit.LoraConfig(r=6), "conv")
    with pytest.raises(ValueError, match="divisible by groups"):
        peft.get_peft_model(Grouped(2, 4, True), peft.LoraConfig(r=6, target_modules=["conv"]))
    with pytest.raises(ValueError, match="grouped convolution"):
        LoraAdapter(base, peftkit.LoraConfig(r=4, init_lora_weights="pissa"), "conv")


# -- LoHa / LoKr on Conv3d ---------------------------------------------------------------------------------
LYCORIS = {
    "loha": (peftkit.LoHaConfig, peft.LoHaConfig, {"r": 2, "alpha": 3}),
    "loha_cp": (peftkit.LoHaConfig, peft.LoHaConfig, {"r": 2, "alpha": 3, "use_effective_conv2d": True}),
    "lokr": (peftkit.LoKrConfig, peft.LoKrConfig, {"r": 2, "alpha": 3}),
    "lokr_full": (peftkit.LoKrConfig, peft.LoKrConfig, {"r": 8, "alpha": 3}),
    "lokr_cp": (peftkit.LoKrConfig, peft.LoKrConfig, {"r": 1, "alpha": 3, "use_effective_conv2d": True}),
    "lokr_both": (peftkit.LoKrConfig, peft.LoKrConfig, {"r": 1, "alpha": 2, "decompose_both": True}),
}


def _by_hand_delta(state: dict[str, torch.Tensor], shape: torch.Size, scale: float) -> torch.Tensor:
    """The LyCORIS delta written out (einsum / explicit Kronecker index map), for a (c_out, c_in, *k) kernel."""
    s = {k.rsplit(".", 1)[-1]: v for k, v in state.items()}
    if "hada_t1" in s:
        w1 = torch.einsum("ijabc,io,jq->oqabc", s["hada_t1"], s["hada_w1_a"], s["hada_w1_b"])
        w2 = torch.einsum("ijabc,io,jq->oqabc", s["hada_t2"], s["hada_w2_a"], s["hada_w2_b"])
        return (w1 * w2 * scale).reshape(shape)
    if "hada_w1_a" in s:
        return (s["hada_w1_a"] @ s["hada_w1_b"] * (s["hada_w2_a"] @ s["hada_w2_b"]) * scale).reshape(shape)
    w1 = s["lokr_w1"] if "lokr_w1" in s else s["lokr_w1_a"] @ s["lokr_w1_b"]
    if "lokr_w2" in s:
        w2 = s["lokr_w2"]
    elif "lokr_t2" in s:
        w2 = torch.einsum("ijabc,io,jq->oqabc", s["lokr_t2"], s["lokr_w2_a"], s["lokr_w2_b"])
    else:
        w2 = (s["lokr_w2_a"] @ s["lokr_w2_b"]).reshape(s["lokr_w2_a"].shape[0], -1, *shape[2:])
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    delta = torch.zeros(shape)
    for i in range(a):
        for j in range(c):
            delta[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    return delta * scale


@pytest.mark.parametrize("case", sorted(LYCORIS))
def test_lycoris_conv3d(case, tmp_path):
    ours_cls, _, kwargs = LYCORIS[case]
    family = video(groups=2)
    model = peftkit.get_peft_model(family.model(), ours_cls(target_modules=family.targets, **kwargs))
    base_out = family.run(family.model())
    torch.testing.assert_close(family.run(model), base_out, atol=0, rtol=0)  # identity at init
    perturb(model, scale=0.3, seed=5)
    state = peftkit.get_peft_model_state_dict(model)
    # parameter count: the closed form and the file
    n_trainable = model.get_nb_trainable_parameters()[0]
    assert n_trainable == sum(v.numel() for v in state.values())
    adapter_cls = type(model.base_model.model.stem.adapters["default"])
    cfg = ours_cls(target_modules=family.targets, **kwargs)
    assert n_trainable == sum(adapter_cls.param_count(m, cfg, k) for k, m in family.model().named_children())
    if "cp" in case:
        assert state["base_model.model.stem.%s" % ("hada_t1" if "loha" in case else "lokr_t2")].shape[2:] == (3, 3, 3)

    # the output is the base convolution with W0 + delta, the delta written out by hand
    ref = family.model()
    with torch.no_grad():
        for name in ("stem", "mix"):
            conv = getattr(ref, name)
            layer_state = {k: v for k, v in state.items() if f".{name}." in k}
            conv.weight += _by_hand_delta(layer_state, conv.weight.shape, kwargs["alpha"] / kwargs["r"])
    out = family.run(model)
    assert (out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(out, family.run(ref), atol=1e-5, rtol=1e-5)

    # merged == unmerged, unmerge bit-exact, save / load round trip
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    model.merge_adapter()
    torch.testing.assert_close(family.run(model), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(before[k], v) for k, v in model.get_base_model().state_dict().items())
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    torch.testing.assert_close(family.run(loaded), out, atol=0, rtol=0)

    # gradients reach every adapter tensor and nothing else
    model.train()
    family.run(model).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if ".adapters." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def _depth1(model3d: nn.Module) -> nn.Module:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    with torch.no_grad():
        conv.weight.copy_(model3d.weight[:, :, 0])
        conv.bias.copy_(model3d.bias)
    return conv


@pytest.mark.parametrize("case", sorted(LYCORIS))
def test_lycoris_conv3d_depth1_matches_peft_conv2d(case):
    """A Conv3d with a (1, 3, 3) kernel is PEFT's Conv2d applied to each frame: the same adapter tensors
    (a kernel axis of 1 inserted) give PEFT's Conv2d output, frame by frame."""
    ours_cls, ref_cls, kwargs = LYCORIS[case]
    torch.manual_seed(0)
    base3d = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1), groups=2)
    holder3d, holder2d = nn.Sequential(base3d), nn.Sequential(_depth1(base3d))
    theirs = peft.get_peft_model(holder2d, ref_cls(target_modules=["0"], **kwargs))
    perturb(theirs, scale=0.3, seed=7)
    ours = peftkit.get_peft_model(holder3d, ours_cls(target_modules=["0"], **kwargs))
    ref_state = peft.get_peft_model_state_dict(theirs)
    our_shapes = {k: v.shape for k, v in peftkit.get_peft_model_state_dict(ours).items()}
    assert our_shapes.keys() == ref_state.keys()
    converted = {}
    for key, value in ref_state.items():
        if value.shape != our_shapes[key]:  # kernels (..., 3, 3) -> (..., 1, 3, 3)
            value = value.unsqueeze(-3)
        assert value.shape == our_shapes[key], key
        converted[key] = value
    peftkit.set_peft_model_state_dict(ours, converted)
    x = torch.randn(2, 8, 4, 5, 5)
    frames = x.transpose(1, 2).reshape(8, 8, 5, 5)
    expected = theirs(frames).reshape(2, 4, 8, 5, 5).transpose(1, 2)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_peft_has_no_conv3d_lycoris():
    """Recorded so that a PEFT release adding them is noticed (then compare layouts directly)."""
    for cfg in (peft.LoHaConfig(target_modules=["mix"]), peft.LoKrConfig(target_modules=["mix"])):
        with pytest.raises(TypeError, match="not supported"):
            peft.get_peft_model(Video(), cfg)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_mixed_batch_on_conv3d(method):
    """``adapter_names`` routes each row of a batch through its adapter (or the base) on Conv3d layers,
    grouped and not: each row equals the output of that adapter alone."""
    family = video(groups=2)
    configs = {
        "lora": lambda: peftkit.LoraConfig(r=4, target_modules=["stem", "mix"]),
        "dora": lambda: peftkit.LoraConfig(r=4, target_modules=["stem", "mix"], use_dora=True),
        "ia3": lambda: peftkit.IA3Config(target_modules=["stem", "mix"], feedforward_modules=["mix"]),
        "loha": lambda: peftkit.LoHaConfig(r=2, target_modules=["stem", "mix"]),
        "lokr": lambda: peftkit.LoKrConfig(r=2, target_modules=["stem", "mix"]),
    }
    model = peftkit.get_peft_model(family.model(), configs[method](), adapter_name="a")
    model.add_adapter("b", configs[method]())
    perturb(model, scale=0.3, seed=11)
    model.eval()
    x = torch.randn(3, 3, 4, 6, 6)
    mixed = model(x=x, adapter_names=["a", "__base__", "b"])
    with torch.no_grad():
        model.set_adapter("a")
        torch.testing.assert_close(mixed[0], model(x=x[:1])[0], atol=1e-5, rtol=1e-5)
        model.set_adapter("b")
        torch.testing.assert_close(mixed[2], model(x=x[2:])[0], atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(mixed[1], model(x=x[1:2])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1]) and not torch.allclose(mixed[2], mixed[1])
