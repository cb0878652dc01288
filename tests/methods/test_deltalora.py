"""Delta-LoRA: the config, the paper's in-place update of W trained side by side with peftkit's adapter, the start
step, the adapter file reproducing the trained model, the merge formula and the training-loop hooks."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.deltalora import DeltaLoraAdapter, DeltaLoraConfig, delta_lora_step
from peftkit.methods.deltalora import functional as DF

from ..families import FAMILY
from ..parity import field_defaults

SHARED = ("r", "target_modules", "exclude_modules", "lora_alpha", "fan_in_fan_out", "bias", "modules_to_save",
          "init_lora_weights", "layers_to_transform", "layers_pattern")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_config_fields_are_loras_plus_the_papers(tmp_path):
    ours, theirs = field_defaults(DeltaLoraConfig), field_defaults(peft.LoraConfig)
    assert {k: ours[k] for k in SHARED} == {k: theirs[k] for k in SHARED}
    assert set(ours) - set(theirs) == {"update_ratio", "update_start_step"} and "lora_dropout" not in ours
    DeltaLoraConfig(update_ratio=2.0, update_start_step=7).save_pretrained(tmp_path)
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DeltaLoraConfig) and (loaded.update_ratio, loaded.update_start_step) == (2.0, 7)


@pytest.mark.parametrize("bad", [{"update_ratio": -0.1}, {"update_ratio": "1"}, {"update_start_step": -1},
                                 {"update_start_step": 1.5}, {"r": 0}, {"lora_alpha": -1}, {"bias": "lora"},
                                 {"init_lora_weights": "olora"}])
def test_bad_config_values_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=f"DeltaLoraConfig.{field}"):
        DeltaLoraConfig(**bad)


def test_the_update_telescopes():
    """Summing the paper's per-step updates W += lambda s (B' A' - B A) gives lambda s (B_T A_T - B_0 A_0)."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 5, dtype=torch.float64)
    factors = [(torch.randn(2, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)) for _ in range(5)]
    w = w0
    for (A_old, B_old), (A_new, B_new) in zip(factors, factors[1:]):
        step = DF.paper_update(w, A_new, B_new, A_old, B_old, 1.5, 0.7)
        torch.testing.assert_close(step - w, 0.7 * 1.5 * (B_new @ A_new - B_old @ A_old), atol=1e-12, rtol=0)
        w = step
    (A0, B0), (AT, BT) = factors[0], factors[-1]
    torch.testing.assert_close(w - w0, DF.weight_update(AT, BT, A0, B0, 1.5, 0.7), atol=1e-12, rtol=0)
    torch.testing.assert_close(w - w0, 0.7 * 1.5 * (BT @ AT - B0 @ A0), atol=1e-12, rtol=0)


def _models(ratio=0.5, start=1, alpha=8):
    """peftkit's Delta-LoRA and a peftkit LoRA with the same factors (the paper's loop runs on the latter)."""
    family = FAMILY["llama"]
    ours = peftkit.get_peft_model(family.model(), DeltaLoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS,
                                                                   update_ratio=ratio, update_start_step=start))
    ref = peftkit.get_peft_model(family.model(), peftkit.LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS))
    pairs = []
    for (path, layer), (_, ref_layer) in zip(ours.base_model.adapter_layers(), ref.base_model.adapter_layers()):
        a, b = layer.adapters["default"], ref_layer.adapters["default"]
        with torch.no_grad():
            b.lora_A.copy_(a.lora_A)
        pairs.append((path, layer, ref_layer))
    return family, ours, ref, pairs


def _train(model, family, steps, after_step):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for t in range(steps):
        opt.zero_grad()
        torch.manual_seed(100 + t)  # the batch of step t
        family.run(model).pow(2).mean().backward()
        opt.step()
        after_step(t)
    model.eval()


def test_training_equals_the_papers_in_place_algorithm():
    """Algorithm 1 literally on a plain LoRA model (after each step t > K: W += lambda s (B_{t+1} A_{t+1} - B_t A_t)
    into the base weight) against peftkit's Delta-LoRA with delta_lora_step after each optimizer step."""
    ratio, start, steps = 0.5, 1, 6
    family, ours, ref, pairs = _models(ratio, start)
    w0 = {path: ref_layer.base_layer.weight.detach().clone() for path, _, ref_layer in pairs}
    before = {}

    def paper_step(t):
        for path, _, ref_layer in pairs:
            a = ref_layer.adapters["default"]
            old = before.get(path)
            if t > start:
                with torch.no_grad():
                    w = ref_layer.base_layer.weight
                    w.copy_(DF.paper_update(w, a.lora_A, a.lora_B, *old, a.scaling, ratio))
            before[path] = (a.lora_A.detach().clone(), a.lora_B.detach().clone())

    for path, _, ref_layer in pairs:  # the factors before the first step
        a = ref_layer.adapters["default"]
        before[path] = (a.lora_A.detach().clone(), a.lora_B.detach().clone())
    _train(ref, family, steps, paper_step)
    _train(ours, family, steps, lambda t: delta_lora_step(ours))
    moved = 0.0
    for path, layer, ref_layer in pairs:
        adapter, ref_adapter = layer.adapters["default"], ref_layer.adapters["default"]
        torch.testing.assert_close(adapter.lora_B, ref_adapter.lora_B, atol=1e-6, rtol=1e-4)
        w_paper = ref_layer.base_layer.weight - w0[path]
        torch.testing.assert_close(adapter.weight_update(), w_paper, atol=1e-6, rtol=1e-4)
        assert torch.equal(layer.base_layer.weight, w0[path])  # peftkit's base stays W0
        moved = max(moved, w_paper.abs().max().item())
    assert moved > 1e-3  # W did move
    with torch.no_grad():
        torch.testing.assert_close(family.run(ours), family.run(ref), atol=1e-5, rtol=1e-4)


def test_start_factors_are_those_after_step_k():
    family, ours, _, pairs = _models(start=2)
    seen = {}

    def record(t):
        delta_lora_step(ours)
        a = pairs[0][1].adapters["default"]
        seen[t] = (a.lora_A.detach().clone(), a.lora_B.detach().clone())

    _train(ours, family, 5, record)
    a = pairs[0][1].adapters["default"]
    assert torch.equal(a.lora_A_start, seen[2][0]) and torch.equal(a.lora_B_start, seen[2][1])
    assert not torch.equal(a.lora_B, seen[2][1])
    assert ours.base_model.hook_state["default"] == 5


def test_save_load_into_a_fresh_base_reproduces_the_trained_model(tmp_path):
    family, ours, _, _ = _models(start=0)
    _train(ours, family, 4, lambda t: ours.base_model.on_step(t + 1))  # peftkit.train's call
    with torch.no_grad():
        expected = family.run(ours)
    ours.save_pretrained(tmp_path)
    state = peftkit.load_peft_weights(str(tmp_path))
    suffixes = {k.split("self_attn.")[-1].split("mlp.")[-1] for k in state}
    assert {s.split(".", 1)[1] for s in suffixes} == {"lora_A.weight", "lora_B.weight", "lora_A_start",
                                                      "lora_B_start"}
    loaded = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)  # bit for bit
        with loaded.disable_adapter():
            torch.testing.assert_close(family.run(loaded), family.run(family.model()), atol=0, rtol=0)
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(family.run(merged), expected, atol=1e-5, rtol=1e-5)


def test_merge_writes_w0_plus_the_whole_change():
    torch.manual_seed(0)
    for conv1d in (False, True):
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(6, 5) if conv1d else nn.Linear(5, 6)
        adapter = DeltaLoraAdapter(base, DeltaLoraConfig(r=2, lora_alpha=3, update_ratio=0.25,
                                                         init_lora_weights=False))
        with torch.no_grad():
            adapter.lora_A_start.normal_()
            adapter.lora_B_start.normal_()
        A, B, A0, B0 = adapter.lora_A, adapter.lora_B, adapter.lora_A_start, adapter.lora_B_start
        change = 1.5 * (1.25 * B @ A - 0.25 * B0 @ A0)  # s ((1 + lambda) B A - lambda B0 A0), (d_out, d_in)
        merged, _ = adapter.merge(base, base.weight.detach())
        torch.testing.assert_close(merged, base.weight + (change.t() if conv1d else change), atol=1e-6, rtol=0)
        x = torch.randn(3, 5)
        w = base.weight.t() if conv1d else base.weight
        torch.testing.assert_close(adapter(base, x, base(x)), x @ (w + change).t() + base.bias, atol=1e-5, rtol=0)


def test_gradients_are_loras_for_the_factors_and_go_through_w_t_for_the_input():
    """W is not differentiated: the factors' gradients are LoRA's, whatever W's update holds; the input's gradient
    is through the layer's weight W_T = W0 + lambda s (B A - B0 A0) plus s B A."""
    base = nn.Linear(5, 6).requires_grad_(False)
    adapter = DeltaLoraAdapter(base, DeltaLoraConfig(r=2, lora_alpha=2, update_ratio=3.0, init_lora_weights=False))
    with torch.no_grad():
        adapter.lora_A_start.normal_()
        adapter.lora_B_start.normal_()
    x, g = torch.randn(4, 5, requires_grad=True), torch.randn(4, 6)
    (adapter(base, x, base(x)) * g).sum().backward()
    A, B, A0, B0 = adapter.lora_A.detach(), adapter.lora_B.detach(), adapter.lora_A_start, adapter.lora_B_start
    torch.testing.assert_close(adapter.lora_B.grad, g.t() @ (x.detach() @ A.t()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.lora_A.grad, (g @ B).t() @ x.detach(), atol=1e-5, rtol=1e-5)
    w_t = base.weight + 3.0 * (B @ A - B0 @ A0)
    torch.testing.assert_close(x.grad, g @ (w_t + B @ A), atol=1e-5, rtol=1e-5)


def test_hook_refuses_a_merged_layer_and_the_step_function_needs_delta_lora():
    family, ours, _, _ = _models()
    ours.merge_adapter()
    with pytest.raises(RuntimeError, match="merged into .*unmerge"):
        delta_lora_step(ours)
    ours.unmerge_adapter()
    assert delta_lora_step(ours) == 1 and delta_lora_step(ours, global_step=9) == 9
    lora = peftkit.get_peft_model(family.model(), peftkit.LoraConfig(r=2))
    with pytest.raises(ValueError, match="not an active, trainable Delta-LoRA adapter"):
        delta_lora_step(lora, adapter_name="default")
    with pytest.raises(TypeError, match="expected a PeftModel"):
        delta_lora_step(nn.Linear(2, 2))
