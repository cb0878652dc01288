"""Prompt methods: configs, applicability errors, exact parameter counts, files on disk, labels, P-tuning's
encoder cache, initialisations, P-tuning v2's preset."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.prompt import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PTuningV2Config,
)
from peftkit.targeting import NotApplicableError

from ..families import FAMILY


def wrap(family: str, config):
    return peftkit.get_peft_model(FAMILY[family].model(), config)


# -- applicability ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,config,needle", [
    ("vit", PromptTuningConfig(num_virtual_tokens=2), "no token input embedding"),
    ("convnet", PromptEncoderConfig(num_virtual_tokens=2), "no token input embedding"),
    ("vit", PrefixTuningConfig(num_virtual_tokens=2), "KV-cache interface"),
    ("clip", PrefixTuningConfig(num_virtual_tokens=2), "KV-cache interface"),
    ("bert", AdaptionPromptConfig(adapter_len=2, adapter_layers=1), "adaption_prompt supports"),
])
def test_not_applicable_fails_at_get_peft_model_naming_alternatives(family, config, needle):
    model = FAMILY[family].model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(NotApplicableError, match=needle) as err:
        peftkit.get_peft_model(model, config)
    assert "lora" in str(err.value) or "prompt_tuning" in str(err.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_adapter_layers_beyond_the_model_names_the_field():
    with pytest.raises(NotApplicableError, match="adapter_layers: 5 layers asked"):
        wrap("llama", AdaptionPromptConfig(adapter_len=2, adapter_layers=5))


@pytest.mark.parametrize("make,field", [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
     "tokenizer_name_or_path"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU"),
     "encoder_reparameterization_type"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones"), "init_weights"),
    (lambda: PTuningV2Config(num_virtual_tokens=2, prefix_projection=True), "prefix_projection"),
    (lambda: AdaptionPromptConfig(adapter_len=0, adapter_layers=1), "adapter_len"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_missing_num_virtual_tokens_is_reported_at_injection():
    with pytest.raises(ConfigError, match="num_virtual_tokens: required"):
        wrap("gpt2", PromptTuningConfig())


# -- parameter counts (closed forms, by hand) --------------------------------------------------------------
def trainable(model) -> int:
    return model.get_nb_trainable_parameters()[0]


def test_parameter_counts_by_hand():
    d, L, n = 32, 2, 3
    assert trainable(wrap("gpt2", PromptTuningConfig(num_virtual_tokens=n))) == n * d
    assert trainable(wrap("gpt2", PrefixTuningConfig(num_virtual_tokens=n))) == n * 2 * L * d
    # Llama: 2 key/value heads of width 8, so the prefix is 16 wide per layer and side
    assert trainable(wrap("llama", PrefixTuningConfig(num_virtual_tokens=n))) == n * 2 * L * 16
    h = 8
    mlp = n * d + (d * h + h) + (h * h + h) + (h * d + d)
    assert trainable(wrap("gpt2", PromptEncoderConfig(num_virtual_tokens=n, encoder_hidden_size=h))) == mlp
    lstm_cfg = PromptEncoderConfig(num_virtual_tokens=n, encoder_hidden_size=h, encoder_reparameterization_type="LSTM")
    model = wrap("gpt2", lstm_cfg)
    lstm = torch.nn.LSTM(d, h, num_layers=2, bidirectional=True)
    head = (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert trainable(model) == n * d + sum(p.numel() for p in lstm.parameters()) + head
    proj = n * d + (d * h + h) + (h * 2 * L * d + 2 * L * d)
    assert trainable(wrap("gpt2", PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=True,
                                                     encoder_hidden_size=h))) == proj
    assert trainable(wrap("llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=2))) == 2 * (4 * d + 1)
    # P-tuning v2 on BERT seq-cls: the prefix plus the classifier (32 x 3 + 3)
    assert trainable(wrap("bert", PTuningV2Config(num_virtual_tokens=n))) == n * 2 * L * d + 32 * 3 + 3


# -- files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,peft_type,shape", [
    (PromptTuningConfig(num_virtual_tokens=3), "PROMPT_TUNING", (3, 32)),
    (PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8), "P_TUNING", (3, 32)),
    (PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8), "PREFIX_TUNING",
     (3, 128)),
])
def test_file_layout_is_peft_s(tmp_path, config, peft_type, shape):
    model = wrap("gpt2", config)
    model.save_pretrained(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tuple(tensors["prompt_embeddings"].shape) == shape
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["peft_type"] == peft_type
    assert (saved["num_virtual_tokens"], saved["token_dim"], saved["num_transformer_submodules"],
            saved["num_attention_heads"], saved["num_layers"]) == (3, 32, 1, 4, 2)
    assert type(PeftConfig.from_pretrained(tmp_path)) is type(config)


def test_p_tuning_file_holds_the_encoder_output(tmp_path):
    model = wrap("llama", PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8)).eval()
    adapter = model.get_base_model().get_input_embeddings().adapters["default"]
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))["prompt_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(saved, adapter.mlp_head(adapter.embedding.weight), atol=1e-6, rtol=0)
    loaded = peftkit.PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path)
    assert trainable(loaded) == 0 and sum(p.numel() for p in loaded.parameters()) - sum(
        p.numel() for p in FAMILY["llama"].model().parameters()) == 3 * 32  # the encoder is gone


def test_p_tuning_encoder_output_is_cached_outside_training():
    model = wrap("gpt2", PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8)).eval()
    adapter = model.get_base_model().get_input_embeddings().adapters["default"]
    with torch.no_grad():
        first = adapter.prompts()
        assert adapter.prompts() is first  # cached
        adapter.mlp_head[0].bias.add_(1.0)
        again = adapter.prompts()
    assert again is not first and not torch.equal(again, first)  # a changed parameter invalidates it
    assert adapter.prompts().requires_grad  # with autograd on, the encoder runs (gradients flow)


# -- forward semantics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3),
                                    PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8)])
def test_causal_loss_ignores_the_virtual_tokens(config):
    model = wrap("llama", config).eval()
    ids = torch.randint(0, 99, (2, 6))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    # labels [-100 x 3; ids]: the last virtual token predicts ids[0], no position predicts a virtual token
    logits = out.logits[:, 2:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 99), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3)])
def test_explicit_position_ids_and_positional_args_match_the_defaults(config):
    model = wrap("gpt2", config).eval()
    ids = torch.randint(0, 99, (2, 6))
    with torch.no_grad():
        default = model(input_ids=ids).logits
        given = model(input_ids=ids, position_ids=torch.arange(6).expand(2, 6)).logits
        positional = model(ids).logits
    torch.testing.assert_close(given, default, atol=1e-6, rtol=0)
    torch.testing.assert_close(positional, default, atol=0, rtol=0)


def test_sample_vocab_and_text_init_copy_token_embeddings():
    model = FAMILY["gpt2"].model()
    wte = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    peft_model = peftkit.get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    prompt = peft_model.get_base_model().get_input_embeddings().adapters["default"].embedding.weight
    assert all(any(torch.equal(row, w) for w in wte) for row in prompt)

    class Tokenizer:  # a tokenizer object instead of a name (TEXT init)
        name_or_path = "toy"

        def __call__(self, text):
            return {"input_ids": [5, 7]}

    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                tokenizer_name_or_path=Tokenizer())
    prompt = wrap("gpt2", config).get_base_model().get_input_embeddings().adapters["default"].embedding.weight
    torch.testing.assert_close(prompt, wte[[5, 7, 5, 7, 5]], atol=0, rtol=0)
    assert config.to_dict()["tokenizer_name_or_path"] == "toy"


def test_p_tuning_v2_trains_the_head_and_loads_as_prefix_tuning(tmp_path):
    model = wrap("bert", PTuningV2Config(num_virtual_tokens=3))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in names) and len(names) == 3  # prefix, classifier weight and bias
    model.eval()
    ids = torch.randint(0, 99, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(FAMILY["bert"].model(), tmp_path)
    assert type(loaded.peft_config["default"]) is PrefixTuningConfig
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_prefix_on_t5_reaches_the_decoder_only():
    model = wrap("t5", PrefixTuningConfig(num_virtual_tokens=3)).eval()
    ids, dec = torch.randint(0, 99, (2, 6)), torch.randint(0, 99, (2, 4))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=dec)
        with model.disable_adapter():
            base = model(input_ids=ids, decoder_input_ids=dec)
    torch.testing.assert_close(out.encoder_last_hidden_state, base.encoder_last_hidden_state, atol=0, rtol=0)
    assert not torch.allclose(out.logits, base.logits)


def test_one_prompt_adapter_active_at_a_time():
    model = wrap("gpt2", PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=2))
    model.set_adapter("other")
    assert model(input_ids=torch.randint(0, 99, (1, 4))).logits.shape[1] == 6
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="only one prompt adapter"):
        model(input_ids=torch.randint(0, 99, (1, 4)))


def test_adaption_prompt_routes_rows_and_prefix_tuning_refuses_routing():
    model = wrap("llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
        ids = torch.randint(0, 99, (2, 5))
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], adapted[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-6, rtol=0)
    assert not torch.allclose(adapted[1], base[1])
    prefix = wrap("gpt2", PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(NotImplementedError, match="adapter_names"):
        prefix(input_ids=ids, adapter_names=["default", "__base__"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_tuning_routes_rows(family):
    model = wrap(family, PromptTuningConfig(num_virtual_tokens=3)).eval()
    model.add_adapter("short", PromptTuningConfig(num_virtual_tokens=1))
    ids = torch.randint(0, 99, (3, 5))
    with torch.no_grad():
        alone = {}
        for name in ("default", "short"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=["default", "__base__", "short"]).logits
    assert mixed.shape[1] == 3 + 5  # the longest prompt sets the front
    torch.testing.assert_close(mixed[0, 3:], alone["default"][0, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1, 3:], base[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2, 3:], alone["short"][2, 1:], atol=1e-5, rtol=0)


def test_adaption_prompt_caches_its_keys_and_values_outside_autograd(monkeypatch):
    """Decoding steps reuse the prompts' projected keys / values; an in-place change of the prompt (an
    optimizer step, a load) recomputes them, and results equal the uncached computation."""
    from peftkit.methods.prompt.adaption_prompt import AdaptionPromptAdapter

    model = peftkit.get_peft_model(FAMILY["llama"].model(), AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # open the gates
    model.eval()
    ids = torch.randint(0, 99, (2, 6))
    calls = []
    original = AdaptionPromptAdapter._project
    monkeypatch.setattr(AdaptionPromptAdapter, "_project", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        first = model(input_ids=ids).logits
        assert model(input_ids=ids).logits.equal(first) and len(calls) == 2  # one per adapted layer, then cached
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        changed = model(input_ids=ids).logits
    assert len(calls) == 4 and not torch.allclose(changed, first)
    with torch.enable_grad():
        uncached = model(input_ids=ids).logits
    torch.testing.assert_close(changed, uncached.detach(), atol=1e-6, rtol=1e-5)


def test_adaption_prompt_acts_only_in_the_calling_thread():
    """An adapted attention routes its module's attention function to the prompts for the length of the call;
    another thread calling that module or its projections meanwhile gets their plain outputs, the adapted
    output is unchanged, and the module's own config is back afterwards."""
    import threading

    model = wrap("llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # open the gate
    inner = model.get_base_model().model
    base = inner.layers[-1].self_attn.base_layer
    x, ids = torch.randn(2, 3, 32), torch.randint(0, 99, (2, 5))
    rope = inner.rotary_emb(x, torch.arange(3).expand(2, 3))
    seen = {}

    def plain() -> dict:
        return {"q": base.q_proj(x), "o": base.o_proj(x),
                "attention": base(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]}

    def other_thread() -> None:
        # one OpenMP thread: libgomp starts a thread team per calling thread, and a sandbox may refuse threads
        torch.set_num_threads(1)
        seen.update(plain())

    caller = threading.get_ident()

    def meanwhile(module, inputs) -> None:  # runs inside the adapted attention, before its attention function
        if threading.get_ident() != caller:  # the other thread's own call of this module: no thread of its own
            return
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()

    with torch.no_grad():
        alone = model(input_ids=ids).logits
        handle = base.k_proj.register_forward_pre_hook(meanwhile)
        try:
            together = model(input_ids=ids).logits
        finally:
            handle.remove()
        expected = plain()
    assert base.config is model.get_base_model().config
    for name in expected:  # other threads: other GEMM blocking
        torch.testing.assert_close(seen[name], expected[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_adaption_prompt_restores_the_attention_config_after_an_error():
    model = wrap("llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=1)).eval()
    base = model.get_base_model().model.layers[-1].self_attn.base_layer

    def fail(module, inputs) -> None:
        raise ValueError("inside the adapted attention")

    handle = base.v_proj.register_forward_pre_hook(fail)
    try:
        with pytest.raises(ValueError, match="inside the adapted attention"):
            model(input_ids=torch.randint(0, 99, (1, 4)))
    finally:
        handle.remove()
    assert base.config is model.get_base_model().config


def test_adaption_prompt_under_inference_mode_equals_no_grad():
    model = wrap("llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # open the gates
        ids = torch.randint(0, 99, (2, 5))
        expected = model(input_ids=ids).logits
    with torch.inference_mode():
        first, again = model(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adaption_prompt_follows_the_models_attention_function(family):
    """The prompts' term rides on whichever attention function the model's config names: eager (with its
    attention weights returned) and SDPA give the same logits; switching the config takes effect at once."""
    model = wrap(family, AdaptionPromptConfig(adapter_len=4, adapter_layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # open the gates
        ids = torch.randint(0, 99, (2, 5))
        config = model.get_base_model().config
        out = {}
        for name in ("sdpa", "eager"):
            config._attn_implementation = name
            out[name] = model(input_ids=ids, output_attentions=name == "eager")
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    heads = config.num_attention_heads
    assert [a.shape for a in out["eager"].attentions] == [(2, heads, 5, 5)] * config.num_hidden_layers
    torch.testing.assert_close(out["eager"].logits, out["sdpa"].logits, atol=1e-5, rtol=0)
    assert not torch.allclose(out["eager"].logits, base, atol=1e-3)


def test_the_layer_list_prefix_calls_read_follows_a_replaced_layer():
    """``model_layers`` is kept per model between calls and recomputed once a submodule is registered anywhere."""
    from peftkit.methods.prompt import cache

    model = FAMILY["llama"].model()
    first = cache.model_layers(model)
    assert first == list(model.model.layers) and cache.model_layers(model) is first  # kept, not walked again
    fresh = type(model.model.layers[1])(model.config, layer_idx=1)
    model.model.layers[1] = fresh  # a registration: the kept list is stale
    again = cache.model_layers(model)
    assert again == [model.model.layers[0], fresh] and again is not first
