"""ShadowPEFT (peft's ShadowConfig): config, math, files both ways, generation, aux loss, SEQ_CLS, refusals."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import ShadowConfig
from peftkit.config import ConfigError
from peftkit.methods.shadow import functional as SF
from peftkit.targeting import NotApplicableError

from ..families import FAMILY
from ..parity import field_defaults

LLAMA = FAMILY["llama"]


def _pair(**kwargs):
    """peft's and peftkit's Shadow on the same tiny Llama, peft's perturbed (seeded), peftkit's loaded from its file."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(LLAMA.model(), peft.ShadowConfig(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return theirs.eval()


def _ids(shape=(2, 6)):
    return torch.randint(0, 99, shape, generator=torch.Generator().manual_seed(5))


def test_config_fields_and_defaults_match_peft():
    assert field_defaults(ShadowConfig) == field_defaults(peft.ShadowConfig)
    assert ShadowConfig().peft_type == "SHADOW" and peftkit.ShadowConfig is ShadowConfig


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"shadow_dropout": 1.0}, "shadow_dropout"), ({"init_weights": 1}, "init_weights"),
    ({"shadow_num_hidden_layers": 0}, "shadow_num_hidden_layers"), ({"auxiliary_loss_weight": -1}, "auxiliary_loss_weight"),
    ({"shadow_model": "some/folder", "shadow_hidden_size": 8}, "shadow_hidden_size"),
    ({"target_modules": ".*layers.0", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"), ({"update_hidden_size": 2.5}, "update_hidden_size"),
])
def test_bad_values_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ShadowConfig(**kwargs)


def test_injection_and_update_against_the_formula():
    g = torch.Generator().manual_seed(0)
    h, s = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    down, up = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    torch.testing.assert_close(SF.inject(h, s, down, up, 0.3), h + 0.3 * (h - s) @ down.T @ up.T)
    t, gate = nn.Linear(8, 8), nn.Linear(8, 8)
    sig = torch.sigmoid(gate(h))
    torch.testing.assert_close(SF.update(h, s, t, gate, torch.float32), (1 - sig) * s + sig * t(h))


def test_same_initial_state_and_count_as_peft_under_one_seed():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(LLAMA.model(), peft.ShadowConfig(task_type="CAUSAL_LM", init_weights=False))
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(LLAMA.model(), ShadowConfig(task_type="CAUSAL_LM", init_weights=False))
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert mine.keys() == ref.keys() and len(mine) == 30
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key
    # per block 2 d r + 2 (2 d u + u + d) with d = 32, r = u = 8, and the 1-block mirror without embed_tokens
    per_block, backbone = 2 * 32 * 8 + 2 * (2 * 32 * 8 + 8 + 32), 2 * 32 + 32 * (32 + 16 + 16 + 32) + 3 * 37 * 32 + 32
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (2 * per_block + backbone, 29696)
    assert ours.peft_config["default"].target_modules == {"model.layers.0", "model.layers.1"}


def test_peft_file_loads_with_equal_outputs_and_back(tmp_path):
    theirs = _pair()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        assert (expected - LLAMA.model()(input_ids=ids).logits).abs().max() > 1e-2  # the adapter acts
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(LLAMA.model(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_training_gradients_and_aux_loss_match_peft(tmp_path):
    theirs = _pair(shadow_dropout=0.0)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path, is_trainable=True)
    ids = _ids()
    out_ref, out = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.shadow_loss, out_ref.shadow_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=0)
    assert out.loss.item() != pytest.approx(LLAMA.model()(input_ids=ids, labels=ids).loss.item(), abs=1e-3)
    torch.testing.assert_close(ours.last_shadow_loss, out_ref.shadow_loss, atol=1e-5, rtol=0)
    out_ref.loss.backward()
    out.loss.backward()
    ref_grads = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.grad is not None}
    backbone = dict(ours.named_parameters())
    prefix = "base_model.model.model.layers.0.adapters.default.network.backbone."
    for name, p in backbone.items():
        if name.startswith(prefix):
            torch.testing.assert_close(p.grad, ref_grads["base_model.shadow_backbone." + name[len(prefix):]],
                                       atol=1e-5, rtol=0)
    down = ours.base_model.model.model.layers[0].adapters["default"].shadow_down.weight
    torch.testing.assert_close(down.grad, ref_grads["base_model.model.model.layers.0.shadow_down.weight"],
                               atol=1e-5, rtol=0)


def test_the_last_blocks_unread_update_is_not_computed_and_the_state_is_let_go(tmp_path):
    """s^(L) after the last block feeds nothing: its update networks do not run and the call drops s^(L-1) at
    once (peft computes s^(L) and discards it; skipping it keeps the same outputs with less work and memory)."""
    from peftkit.methods.shadow import wrapper

    theirs = _pair(shadow_dropout=0.0)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    layers = ours.base_model.model.model.layers
    ran, states = [], []
    for i, layer in enumerate(layers):
        for part in ("shadow_update_transform", "shadow_update_gate"):
            getattr(layer.adapters["default"], part).register_forward_hook(lambda *a, i=i, part=part: ran.append((i, part)))
        layer.register_forward_hook(lambda *a: states.append(wrapper.current().state))
    ids = _ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)
    last = len(layers) - 1
    assert sorted(ran) == [(i, p) for i in range(last) for p in ("shadow_update_gate", "shadow_update_transform")]
    assert all(s is not None for s in states[:last]) and states[last] is None


def test_generate_with_and_without_cache_gives_peft_uncached_tokens(tmp_path):
    theirs = _pair()
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    ids = _ids((2, 4))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    ref = theirs.generate(**kw, use_cache=False)  # peft's cached decoding drifts under transformers 5 (layer.py)
    assert torch.equal(ours.generate(**kw, use_cache=False), ref)
    assert torch.equal(ours.generate(**kw, use_cache=True), ref)


def test_sequence_classification_matches_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from peftkit.tiny_models import LLAMA as CFG

    def build():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(**CFG, num_labels=3, pad_token_id=0)).eval()

    theirs = peft.get_peft_model(build(), peft.ShadowConfig(task_type="SEQ_CLS", r=4))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(build(), tmp_path, is_trainable=True).eval()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids, labels = _ids(), torch.tensor([0, 2])
    ref, out = theirs(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert any(k.startswith("base_model.shadow_head.default.") for k in load_file(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="multiple adapters"):
        ours.add_adapter("second", ShadowConfig(task_type="SEQ_CLS"))


def test_unload_shadow_gives_peft_detached_model(tmp_path):
    theirs = _pair()
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    ids = _ids()
    for copy in (False, True):
        with torch.no_grad():
            ref = theirs.base_model.unload_shadow(copy=copy)(input_ids=ids).logits
            torch.testing.assert_close(ours.unload_shadow(copy=copy)(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    detached = ours.unload_shadow()
    assert torch.equal(detached.generate(input_ids=ids[:, :3], max_new_tokens=4, do_sample=False),
                       theirs.base_model.unload_shadow().generate(input_ids=ids[:, :3], max_new_tokens=4,
                                                                  do_sample=False))


def test_merge_raises_like_peft_and_disable_unload_give_the_base(tmp_path):
    theirs = _pair()
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path)
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    for merge in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            merge()
    assert all(torch.equal(v, ours.get_base_model().state_dict()[k]) for k, v in before.items())
    ids = _ids()
    base = LLAMA.model()(input_ids=ids).logits
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(ours(input_ids=ids).logits, base, atol=1e-6, rtol=0)
    plain = ours.unload()
    assert not plain._forward_pre_hooks and not plain._forward_hooks and not hasattr(plain, "unload_shadow")
    torch.testing.assert_close(plain(input_ids=ids).logits, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["unet", "bert", "vit"])
def test_models_without_a_decoder_loop_are_refused_untouched(family):
    model = FAMILY[family].model()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(NotApplicableError, match="ShadowPEFT"):
        peftkit.get_peft_model(model, ShadowConfig(task_type=FAMILY[family].task_type))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_two_active_adapters_are_refused_and_switching_works(tmp_path):
    ours = peftkit.get_peft_model(LLAMA.model(), ShadowConfig(task_type="CAUSAL_LM", init_weights=False))
    ours.add_adapter("other", ShadowConfig(task_type="CAUSAL_LM", init_weights=False, r=2))
    ids = _ids()
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        ours.set_adapter("other")
        b = ours(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4
    ours.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="exactly one active adapter"):
        ours(input_ids=ids)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LLAMA.model()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ours = peftkit.get_peft_model(model, ShadowConfig(task_type="CAUSAL_LM", init_weights=False, shadow_dropout=0.0))
        ours.train()
        ours(input_ids=_ids(), labels=_ids(), use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 22  # the last block's T and G get none (as peft)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)
