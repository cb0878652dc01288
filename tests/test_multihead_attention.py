"""Adapters on an ``nn.MultiheadAttention``'s ``out_proj`` (see ``peftkit/mha.py``).

The attention module reads ``out_proj.weight`` / ``.bias`` instead of calling the module, so a plain wrapper
there would do nothing until merged (peft 0.21.2's behaviour). These tests check that the unmerged adapter
acts on every path torch takes: the slow path (train, or autograd on), the fused eval path
``torch._native_multi_head_attention`` and ``nn.TransformerEncoderLayer``'s own fast path.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.mha import EffectiveWeightLayer
from peftkit.registry import get_method, list_methods
from peftkit.targeting import TargetError

D, HEADS = 16, 4


class AttnNet(nn.Module):
    """Self-attention (an ``nn.MultiheadAttention``) then a Linear head."""

    def __init__(self, batch_first: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first, bias=bias)
        self.fc = nn.Linear(D, D)

    def forward(self, x, key_padding_mask=None, attn_mask=None, need_weights=False, average_attn_weights=True):
        out, weights = self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 need_weights=need_weights, average_attn_weights=average_attn_weights)
        y = self.fc(out)
        return (y, weights) if need_weights else y


def encoder(nested: bool = False) -> nn.Module:
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)


def encoder_call(x, kpm):
    """Runs an encoder; padded positions zeroed (the nested-tensor path outputs zeros there, the others not)."""
    return lambda m: m(x, src_key_padding_mask=kpm).masked_fill(kpm[..., None], 0.0)


def inputs(batch_first: bool, padded: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, D, generator=g)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    kpm = None
    if padded:
        kpm = torch.zeros(3, 5, dtype=torch.bool)
        kpm[0, 3:] = True
        kpm[2, 4:] = True
    return x, kpm


def perturb(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Move every adapter tensor away from its identity init, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def runs_fused(monkeypatch, name: str, fn) -> bool:
    """Whether ``fn()``, run without autograd, calls ``torch.<name>`` (one of torch's fused paths)."""
    calls, real = [], getattr(torch, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, name, counted)
    try:
        with torch.no_grad():
            fn()
    finally:
        monkeypatch.setattr(torch, name, real)
    return bool(calls)


def snapshot(layer: EffectiveWeightLayer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in layer.base_layer.named_parameters()}


def check_acts_like_merged(pm, reference, call, mode: str, atol: float = 1e-5, disable_is_base: bool = True) -> None:
    """Unmerged output != base, == merged; unmerge restores the base bit for bit; disable == base.

    ``reference``: a copy of the base model taken before the adapters were added; ``call(model)`` runs a model
    on the test inputs. Each check runs with autograd on and off (off in eval: the fused fast paths)."""
    getattr(pm, mode)()
    getattr(reference, mode)()
    layers = [layer for _, layer in pm.base_model.adapter_layers() if isinstance(layer, EffectiveWeightLayer)]
    assert layers, "no module was wrapped in an EffectiveWeightLayer"
    before = [snapshot(layer) for layer in layers]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            base_out = call(reference)
            unmerged = call(pm)
            assert (unmerged - base_out).abs().max() > 1e-3, "the adapter does not act"
            pm.base_model.merge()
            merged = call(pm)
            pm.base_model.unmerge()
            torch.testing.assert_close(unmerged, merged, atol=atol, rtol=0)
            for layer, params in zip(layers, before):
                for name, value in snapshot(layer).items():
                    assert torch.equal(value, params[name]), f"unmerge did not restore {name} exactly"
            torch.testing.assert_close(call(pm), unmerged, atol=1e-6, rtol=0)
            with pm.disable_adapter():
                disabled = call(pm)
            if disable_is_base:  # PiSSA moved the principal part of the weight into the adapter
                torch.testing.assert_close(disabled, base_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "kpm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
def test_lora_on_out_proj_acts_unmerged(batch_first, padded, mode, monkeypatch):
    torch.manual_seed(0)
    model = AttnNet(batch_first).eval()
    x, kpm = inputs(batch_first, padded)
    reference = copy.deepcopy(model)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["out_proj"]))
    assert isinstance(pm.base_model.model.attn.out_proj, EffectiveWeightLayer)
    perturb(pm)
    check_acts_like_merged(pm, reference, lambda m: m(x, key_padding_mask=kpm), mode)
    # torch's fused attention needs batch_first, eval and no autograd: there the checks above ran through it
    fused = runs_fused(monkeypatch, "_native_multi_head_attention", lambda: pm(x, key_padding_mask=kpm))
    assert fused == (batch_first and mode == "eval")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_the_adapter(mode):
    torch.manual_seed(0)
    model = AttnNet()
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["out_proj"]))
    perturb(pm)
    getattr(pm, mode)()
    x, kpm = inputs(True, True)
    pm(x, key_padding_mask=kpm).square().sum().backward()
    adapter = pm.base_model.model.attn.out_proj.adapters["default"]
    for name in ("lora_A", "lora_B"):
        grad = getattr(adapter, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in pm.named_parameters() if ".adapters." not in n)


def test_need_weights_attn_mask_and_per_head_weights():
    torch.manual_seed(0)
    model = AttnNet(batch_first=False)
    x, _ = inputs(False, False)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    kw = dict(attn_mask=causal, need_weights=True, average_attn_weights=False)
    with torch.no_grad():
        base_out, base_w = model(x, **kw)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["out_proj"]))
    perturb(pm)
    with torch.no_grad():
        out, w = pm(x, **kw)
        pm.base_model.merge()
        merged, _ = pm(x, **kw)
        pm.base_model.unmerge()
    assert w.shape == (3, HEADS, 5, 5)
    torch.testing.assert_close(w, base_w)  # the output projection does not change the attention weights
    assert (out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(out, merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("nested", [False, True], ids=["dense", "nested"])
def test_transformer_encoder_all_linear(nested, mode, monkeypatch):
    torch.manual_seed(0)
    model = encoder(nested).eval()
    x, kpm = inputs(True, True)
    reference = copy.deepcopy(model)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = {p: type(layer) for p, layer in pm.base_model.adapter_layers()}
    assert wrapped["layers.0.self_attn.out_proj"] is EffectiveWeightLayer
    # the encoder layer's fused path reads linear1 / linear2 (and the norms) directly as well
    assert wrapped["layers.1.linear1"] is EffectiveWeightLayer
    assert wrapped["layers.1.linear2"] is EffectiveWeightLayer
    perturb(pm)
    check_acts_like_merged(pm, reference, encoder_call(x, kpm), mode)
    # in eval without autograd the encoder layers ran fused, reading the adapted weights
    fused = runs_fused(monkeypatch, "_transformer_encoder_layer_fwd", lambda: encoder_call(x, kpm)(pm))
    assert fused == (mode == "eval")


@pytest.mark.parametrize("method,kwargs", [("ln_tuning", {}), ("bitfit", {}),
                                           ("ssf", {"target_modules": ["norm1", "linear2"]})])
def test_encoder_layer_fused_path_reads_adapted_norms_and_biases(method, kwargs, monkeypatch):
    torch.manual_seed(0)
    model = encoder().eval()
    x, kpm = inputs(True, True)
    reference = copy.deepcopy(model)
    pm = peftkit.get_peft_model(model, get_method(method).config_cls(**kwargs))
    assert "layers.0.norm1" in {p for p, layer in pm.base_model.adapter_layers() if isinstance(layer, EffectiveWeightLayer)}
    perturb(pm)
    check_acts_like_merged(pm, reference, encoder_call(x, kpm), "eval")
    assert runs_fused(monkeypatch, "_transformer_encoder_layer_fwd", lambda: encoder_call(x, kpm)(pm))


def test_all_linear_includes_out_proj_and_matches_peft_keys(tmp_path):
    torch.manual_seed(0)
    model = AttnNet()
    x, kpm = inputs(True, True)
    reference = copy.deepcopy(model)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules="all-linear"))
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    assert isinstance(pm.base_model.model.attn.out_proj, EffectiveWeightLayer)
    perturb(pm)
    check_acts_like_merged(pm, reference, lambda m: m(x, key_padding_mask=kpm), "eval")
    ref.save_pretrained(tmp_path / "peft")
    pm.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.attn.out_proj.lora_A.weight" in keys


def test_encoder_all_linear_file_keys_match_peft(tmp_path):
    model = encoder()
    cfg = dict(r=4, target_modules="all-linear")
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).save_pretrained(tmp_path / "peft")
    peftkit.get_peft_model(model, peftkit.LoraConfig(**cfg)).save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.layers.1.self_attn.out_proj.lora_B.weight" in keys


@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
def test_save_load_round_trip(batch_first, tmp_path):
    torch.manual_seed(0)
    model = AttnNet(batch_first)
    fresh = copy.deepcopy(model)
    x, kpm = inputs(batch_first, True)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["out_proj"]))
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["out_proj"]))
    perturb(pm)
    pm.eval()
    with torch.no_grad():
        expected = pm(x, key_padding_mask=kpm)
    pm.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    loaded = peftkit.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    assert isinstance(loaded.base_model.model.attn.out_proj, EffectiveWeightLayer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, key_padding_mask=kpm), expected, atol=0, rtol=0)
    # the state dict keeps the wrapper's keys (base weight under base_layer)
    assert "base_model.model.attn.out_proj.base_layer.weight" in loaded.state_dict()


def _weight_delta_examples():
    """(method, example, kwargs) of every mergeable method whose config takes target_modules (LN tuning only
    adapts norms; trainable tokens trains rows of a vocabulary, its example's indices are token ids)."""
    out = []
    for spec in list_methods():
        if not spec.mergeable or "target_modules" not in spec.config_cls.__dataclass_fields__:
            continue
        if spec.name in ("ln_tuning", "trainable_tokens", "textual_inversion"):  # embedding rows, not out_proj
            continue
        out.extend(pytest.param(spec, kw, id=name) for name, kw in spec.examples)
    return out


@pytest.mark.parametrize("spec,kwargs", _weight_delta_examples())
def test_every_weight_delta_method_acts_on_out_proj(spec, kwargs):
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, kpm = inputs(True, True)
    reference = copy.deepcopy(model)
    pm = peftkit.get_peft_model(model, spec.config_cls(**{**kwargs, "target_modules": ["out_proj"]}))
    assert isinstance(pm.base_model.model.attn.out_proj, EffectiveWeightLayer)
    perturb(pm, scale=0.2)
    # gradients reach every trainable tensor of the adapter (train mode: the method's training forward)
    pm.train()
    pm(x, key_padding_mask=kpm).square().sum().backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # eval: diff pruning's gates are random in training, deterministic (as merged) in eval
    check_acts_like_merged(pm, reference, lambda m: m(x, key_padding_mask=kpm), "eval",
                           disable_is_base=kwargs.get("init_lora_weights") != "pissa")


def test_ia3_and_loha_stack_on_one_out_proj():
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, kpm = inputs(True, True)
    reference = copy.deepcopy(model)
    pm = peftkit.get_peft_model(model, get_method("ia3").config_cls(target_modules=["out_proj"],
                                                                    feedforward_modules=[]))
    pm.add_adapter("loha", get_method("loha").config_cls(r=4, alpha=4, target_modules=["out_proj"]))
    pm.base_model.set_adapter(["default", "loha"])
    perturb(pm)
    check_acts_like_merged(pm, reference, lambda m: m(x, key_padding_mask=kpm), "eval")
    pm.delete_adapter("loha")
    pm.delete_adapter("default")
    assert type(pm.base_model.model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_merge_and_unload_gives_the_plain_module():
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, kpm = inputs(True, True)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["out_proj"]))
    perturb(pm)
    with torch.no_grad():
        unmerged = pm(x, key_padding_mask=kpm)
        plain = pm.merge_and_unload()
        assert type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        torch.testing.assert_close(plain(x, key_padding_mask=kpm), unmerged, atol=1e-5, rtol=0)


def test_ssf_shift_on_bias_free_attention():
    """A merge that creates the bias (SSF's shift on ``bias=False``) acts unmerged too."""
    torch.manual_seed(0)
    model = AttnNet(bias=False).eval()
    x, kpm = inputs(True, False)
    reference = copy.deepcopy(model)
    pm = peftkit.get_peft_model(model, get_method("ssf").config_cls(target_modules=["out_proj"]))
    perturb(pm)
    check_acts_like_merged(pm, reference, lambda m: m(x), "train")
    assert pm.base_model.model.attn.out_proj.base_layer.bias is None


def test_mixed_batch_one_adapter_per_call():
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, _ = inputs(True, False)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["out_proj"]))
    pm.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["out_proj"]))
    perturb(pm)
    with torch.no_grad():
        pm.set_adapter("other")
        expected = pm(x)
        pm.set_adapter("default")
        torch.testing.assert_close(pm(x, adapter_names=["other"] * 3), expected)
        with pytest.raises(ValueError, match=r"attn\.out_proj.*nn\.MultiheadAttention"):
            pm(x, adapter_names=["default", "other", "__base__"])


def test_adapter_dropout_warns_that_it_is_not_applied():
    with pytest.warns(UserWarning, match=r"lora_dropout.*attn\.out_proj"):
        peftkit.get_peft_model(AttnNet(), peftkit.LoraConfig(r=4, lora_dropout=0.1, target_modules=["out_proj"]))


def test_methods_that_are_not_weight_deltas_are_refused_or_skipped():
    cfg = get_method("houlsby").config_cls
    with pytest.raises(TargetError, match=r"'attn\.out_proj'.*MultiheadAttention.*exclude_modules"):
        peftkit.get_peft_model(AttnNet(), cfg(bottleneck_size=4, target_modules=["out_proj"]))
    with pytest.warns(UserWarning, match=r"all-linear' skips \['attn\.out_proj'\]"):
        pm = peftkit.get_peft_model(AttnNet(), cfg(bottleneck_size=4, target_modules="all-linear"))
    assert [p for p, _ in pm.base_model.adapter_layers()] == ["fc"]
    # nn.TransformerEncoderLayer's fused path reads linear2's weight: refused there as well
    with pytest.raises(TargetError, match=r"'layers\.0\.linear2'.*TransformerEncoderLayer.*exclude_modules"):
        peftkit.get_peft_model(encoder(), cfg(bottleneck_size=4, target_modules=["linear2"]))


def test_torch_compile_full_graph():
    torch.manual_seed(0)
    model = AttnNet()
    x, kpm = inputs(True, True)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["out_proj"]))
    perturb(pm)
    eager = pm(x, key_padding_mask=kpm)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in pm.parameters() if p.requires_grad]
    pm.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(pm.base_model.model, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(x, key_padding_mask=kpm)
    torch.testing.assert_close(out, eager)
    out.square().sum().backward()
    for g, p in zip(grads, [p for p in pm.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)
    torch._dynamo.reset()
