"""LLaMA-Adapter V2 on a tiny LLaVA: bias / scale tuning against y = s (W x + b), the gated attention of one layer
computed by hand (with and without the early-fused visual prompt), start at the base, gradients, merge of the
bias / scale part, save / load, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterLayer, PeftModel, get_peft_model, tiny_models
from peftkit.config import ConfigError
from peftkit.methods.llama_adapter_v2 import (
    BiasScaleAdapter,
    GatedPromptAdapter,
    LlamaAdapterV2Config,
    merge_bias_scale,
)
from peftkit.methods.llama_adapter_v2.visual import STASH

torch.set_num_threads(1)

IMAGE = 63  # the image token id
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)


def llava() -> nn.Module:
    """A tiny LLaVA: 1-layer CLIP vision tower on 16 px images with 8 px patches (4 image tokens), 3-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                         vision_feature_layer=-1)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def inputs(image: bool = True) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (2, 9), generator=g)
    if not image:
        return {"input_ids": ids}
    ids[:, 1:5] = IMAGE
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def cfg(**kw) -> LlamaAdapterV2Config:
    return LlamaAdapterV2Config(**{"adapter_len": 4, "visual_layers": 1, "adapter_layers": 1, **kw})


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def adapted(model: nn.Module, path: str, name: str = "default"):
    return model.base_model.model.get_submodule(path).adapters[name]


@pytest.fixture(scope="module")
def base_out():
    with torch.no_grad():
        return llava()(**inputs()).logits


def test_config_defaults_and_bad_values():
    c = LlamaAdapterV2Config()
    assert (c.adapter_len, c.adapter_layers, c.visual_layers, c.visual_module, c.bias_scale, c.tune_norms) == (
        10, None, None, "multi_modal_projector", True, True)
    assert c.peft_type == "LLAMA_ADAPTER_V2" and peftkit.get_method("llama_adapter_v2").category == "hybrid"
    for field, value in [("adapter_len", 0), ("visual_layers", -1), ("adapter_layers", 1.5), ("visual_module", ""),
                         ("tune_norms", "yes"), ("bias_scale", None)]:
        with pytest.raises(ConfigError, match=f"LlamaAdapterV2Config.{field}"):
            LlamaAdapterV2Config(**{field: value})


def test_layout_defaults_and_start_at_base_exactly(base_out):
    model = get_peft_model(llava(), LlamaAdapterV2Config(adapter_len=4)).eval()
    config = model.peft_config["default"]
    # on a VLM: V = 1 early visual layer, L = the other 2; the visual module resolved to its path
    assert (config.visual_layers, config.adapter_layers, config.visual_module) == (1, 2, "model.multi_modal_projector")
    kinds = {p: type(a).__name__ for p, layer in model.base_model.adapter_layers() for a in layer.adapters.values()}
    assert not any("vision_tower" in p or "multi_modal_projector" in p or "lm_head" in p for p in kinds)
    prompts = sorted(p for p, k in kinds.items() if k == "GatedPromptAdapter")
    assert prompts == [f"model.language_model.layers.{i}.self_attn" for i in range(3)]
    assert sum(k == "BiasScaleAdapter" for k in kinds.values()) == 3 * 7 + 3 * 2 + 1  # linears, block norms, final
    assert [adapted(model, p).visual_path for p in prompts] == ["model.multi_modal_projector", "", ""]
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, base_out)  # s = 1, b = 0, g = 0: bit for bit


def test_parameter_count_by_hand():
    model = get_peft_model(llava(), cfg())
    d, f, hd, kv, L = 16, 24, 4, 2, 3
    linears = 2 * (d + kv * hd + kv * hd + d + f + f + d)  # bias and scale per output channel: q k v o gate up down
    norms = (2 * L + 1) * d  # RMSNorm: a scale per feature, no bias
    prompts = 2 * (4 * d + 1)  # one visual and one text layer: K x d prompts and a gate each
    assert model.get_nb_trainable_parameters()[0] == L * linears + norms + prompts


@torch.no_grad()
def test_bias_scale_equals_its_formula():
    model = get_peft_model(llava(), cfg())
    perturb(model)
    x = torch.randn(2, 5, 16)
    q = model.base_model.model.get_submodule("model.language_model.layers.1.self_attn.q_proj")
    a = q.adapters["default"]
    torch.testing.assert_close(q(x), a.adapter_scale * (x @ q.base_layer.weight.T + a.adapter_bias), atol=1e-6, rtol=0)
    norm = model.base_model.model.get_submodule("model.language_model.layers.1.input_layernorm")
    base = norm.base_layer
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + base.variance_epsilon)
    torch.testing.assert_close(norm(x), norm.adapters["default"].adapter_scale * (base.weight * rms), atol=1e-6, rtol=0)
    assert norm.adapters["default"].adapter_bias is None  # an RMSNorm has no bias to tune


def _rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def _by_hand(attention, adapter, h, cos, sin, visual):
    """The gated attention of one layer from its parameters: the projections with their bias and scale, rotary
    queries and keys, causal softmax attention, plus g softmax(q (W_k P')^T / sqrt(d_h)) W_v P', then W_o."""
    def lin(name, x):
        layer = getattr(attention, name)
        ad = layer.adapters["default"]
        return ad.adapter_scale * (x @ layer.base_layer.weight.T + ad.adapter_bias)

    b, t, d = h.shape
    heads, dh = 4, 4

    def split(x):  # (b, n, width) -> (b, heads, n, dh), key / value heads repeated for their query group
        x = x.view(b, x.shape[1], -1, dh).transpose(1, 2)
        return x.repeat_interleave(heads // x.shape[1], dim=1)

    q = _rotate(split(lin("q_proj", h)), cos[:, None], sin[:, None])
    k = _rotate(split(lin("k_proj", h)), cos[:, None], sin[:, None])
    v = split(lin("v_proj", h))
    scores = q @ k.transpose(-1, -2) / dh ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    prompt = adapter.adaption_prompt + visual[:, None, :]  # P' = P + 1 v^T (v = 0 in a text layer)
    pk, pv = split(lin("k_proj", prompt)), split(lin("v_proj", prompt))
    out = out + adapter.adaption_gate * (q @ pk.transpose(-1, -2) / dh ** 0.5).softmax(-1) @ pv
    return lin("o_proj", out.transpose(1, 2).reshape(b, t, d))


@torch.no_grad()
def test_gated_attention_with_early_fused_visual_prompt_equals_the_formula():
    model = get_peft_model(llava().double(), cfg())
    perturb(model)
    user = model.base_model.model
    lm = user.model.language_model
    h = torch.randn(2, 6, 16, dtype=torch.float64)
    cos, sin = lm.rotary_emb(h, torch.arange(6)[None].expand(2, -1))
    visual = torch.randn(2, 16, dtype=torch.float64)
    user.__dict__[STASH].set(visual)  # as the projector's hook leaves it for the call
    for index, fused in [(0, True), (2, False)]:  # the early layer adds v, the top layer stays text-only
        wrapper = lm.layers[index].self_attn
        got = wrapper(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
        expected = _by_hand(wrapper.base_layer, wrapper.adapters["default"], h, cos, sin,
                            visual if fused else torch.zeros_like(visual))
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    user.__dict__[STASH].set(None)  # a text-only call: v = 0 in the early layer too
    wrapper = lm.layers[0].self_attn
    got = wrapper(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
    expected = _by_hand(wrapper.base_layer, wrapper.adapters["default"], h, cos, sin, torch.zeros_like(visual))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@torch.no_grad()
def test_visual_prompt_is_the_calls_pooled_projection_and_clears_on_a_text_call():
    model = get_peft_model(llava(), cfg()).eval()
    perturb(model)
    user = model.base_model.model
    seen = []
    handle = user.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    model(**inputs())
    handle.remove()
    torch.testing.assert_close(user.__dict__[STASH].get(), seen[0].mean(dim=1), atol=0, rtol=0)
    text = model(**inputs(image=False)).logits
    assert user.__dict__[STASH].get() is None
    fresh = get_peft_model(llava(), cfg()).eval()
    perturb(fresh)
    torch.testing.assert_close(fresh(**inputs(image=False)).logits, text, atol=0, rtol=0)


@torch.no_grad()
def test_a_cached_decoding_step_keeps_the_first_steps_image():
    """generate's later steps run without pixel_values (the projector does not run): the step with the cache
    equals the whole sequence run again with the image."""
    model = get_peft_model(llava(), cfg()).eval()
    perturb(model)
    x = inputs()
    first = model(**x, use_cache=True)
    step = torch.tensor([[5], [7]])
    cached = model(input_ids=step, cache=first.past_key_values, use_cache=True).logits[:, -1]
    whole = model(input_ids=torch.cat([x["input_ids"], step], 1), pixel_values=x["pixel_values"]).logits[:, -1]
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=1e-5)
    kw = dict(**x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw, use_cache=True), model.generate(**kw, use_cache=False))


def test_only_adapter_parameters_train_and_all_get_gradients():
    model = get_peft_model(llava(), cfg())
    perturb(model)
    model.train()
    model(**inputs()).logits.pow(2).mean().backward()
    own = {id(p) for m in model.modules() if isinstance(m, (BiasScaleAdapter, GatedPromptAdapter))
           for p in m.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in own), name
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("family", ["llava", "gpt2"])
@torch.no_grad()
def test_bias_scale_merges_and_unmerges_bit_exactly(family):
    build, x = (llava, inputs()) if family == "llava" else (tiny_models.gpt2, {"input_ids": inputs()["input_ids"]})
    model = get_peft_model(build(), cfg(visual_layers=0) if family == "gpt2" else cfg()).eval()
    perturb(model)
    before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    unmerged = model(**x).logits
    with pytest.raises(ValueError, match="merge_bias_scale"):  # the prompts do not merge: refused, nothing changes
        model.merge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in model.get_base_model().named_parameters() if n in before)
    assert merge_bias_scale(model) == (28 if family == "llava" else 4 * 2 + 2 * 2 + 1)
    q = ("model.language_model.layers.0.self_attn.base_layer.q_proj" if family == "llava"
         else "transformer.h.1.attn.base_layer.c_attn")  # Linear (out, in); GPT-2's Conv1D (in, out)
    layer = model.base_model.model.get_submodule(q)
    s, b = layer.adapters["default"].adapter_scale, layer.adapters["default"].adapter_bias
    w0, b0 = before[q + ".base_layer.weight"], before.get(q + ".base_layer.bias", torch.zeros_like(b))
    scaled = s[:, None] * w0 if family == "llava" else w0 * s[None, :]
    torch.testing.assert_close(layer.base_layer.weight, scaled, atol=0, rtol=0)  # W' = diag(s) W
    torch.testing.assert_close(layer.base_layer.bias, s * (b0 + b), atol=0, rtol=0)  # b0' = s (b0 + b)
    torch.testing.assert_close(model(**x).logits, unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    after = {n: p for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    assert after.keys() == before.keys()  # the bias a bias-free Linear got for the merge is gone again
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert torch.equal(model(**x).logits, unmerged)


def test_save_load_round_trip(tmp_path):
    model = get_peft_model(llava(), cfg()).eval()
    perturb(model)
    with torch.no_grad():
        expected = model(**inputs()).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    lm = "base_model.model.model.language_model.layers"
    assert {f"{lm}.0.self_attn.adaption_prompt", f"{lm}.0.self_attn.adaption_gate",
            f"{lm}.0.self_attn.q_proj.adapter_scale", f"{lm}.0.self_attn.q_proj.adapter_bias",
            f"{lm}.0.input_layernorm.adapter_scale"} <= keys
    assert not any("base_layer" in k or "vision_tower" in k for k in keys)
    loaded = PeftModel.from_pretrained(llava(), tmp_path).eval()
    assert loaded.peft_config["default"].visual_module == "model.multi_modal_projector"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, expected, atol=1e-6, rtol=1e-6)


def test_a_second_adapter_joins_the_nested_wrappers_and_unload_restores_the_model(base_out):
    model = get_peft_model(llava(), cfg())
    model.add_adapter("other", cfg())
    path = "model.language_model.layers.2.self_attn"
    user = model.base_model.model
    assert set(user.get_submodule(path).adapters) == {"default", "other"}
    assert set(user.get_submodule(path + ".base_layer.k_proj").adapters) == {"default", "other"}
    assert isinstance(user.get_submodule(path + ".base_layer.k_proj").base_layer, nn.Linear)
    perturb(model)
    model.delete_adapter("other")
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert all(STASH not in m.__dict__ for m in plain.modules())  # the visual hooks and stash are gone
    assert not plain._forward_pre_hooks and not plain.model.multi_modal_projector._forward_hooks
    with torch.no_grad():
        assert torch.equal(plain(**inputs()).logits, base_out)


@torch.no_grad()
def test_a_mixed_batch_runs_each_rows_adapter():
    model = get_peft_model(llava(), cfg()).eval()
    model.add_adapter("other", cfg())
    perturb(model)
    x = inputs()
    mixed = model(**x, adapter_names=["other", "default"]).logits
    for row, name in enumerate(["other", "default"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[row], model(**x).logits[row], atol=1e-6, rtol=0)


@pytest.mark.parametrize("build, kwargs, field", [
    (tiny_models.llama, {"visual_layers": 1}, "visual_layers"),  # no vision tower / projector to fuse from
    (llava, {"visual_layers": 4}, "visual_layers"),  # 3 layers
    (llava, {"visual_layers": 1, "adapter_layers": 3}, "adapter_layers"),  # V + L > 3
])
def test_bad_layer_counts_name_the_field_and_leave_the_model_untouched(build, kwargs, field):
    torch.manual_seed(0)
    model = build()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=f"LlamaAdapterV2Config.{field}"):
        get_peft_model(model, cfg(**kwargs))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())
