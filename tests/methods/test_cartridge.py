"""Cartridges against Hugging Face PEFT 0.21.2: config, the frozen / trained split of the KV prefix (same init
under a seed, same counts and gradients), files both ways, generation with and without a cache, the KV-prefix
initialisers (from a cache, from text) and ``compose_cartridge_adapters``, bad input."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.prompt.cartridge import CartridgeAdapter, CartridgeConfig
from peftkit.methods.prompt.cartridge_utils import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)
from peftkit.targeting import NotApplicableError

from ..families import FAMILY, V
from ..parity import field_defaults

ATOL = 1e-5
STEPS = 4


def _pair(family: str = "llama", seed: int = 5, **kw):
    """peft's and peftkit's models built from the same seed (the same draws), in eval mode."""
    kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **kw}
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(FAMILY[family].model(), peft.CartridgeConfig(**kw)).eval()
    torch.manual_seed(seed)
    ours = peftkit.get_peft_model(FAMILY[family].model(), CartridgeConfig(**kw)).eval()
    return theirs, ours


def _adapter(model) -> CartridgeAdapter:
    return next(a for _, a in model.base_model.adapters("default"))


def _ids(rows: int = 2, length: int = 5, seed: int = 11) -> torch.Tensor:
    return torch.randint(1, V, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb(model, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.5 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    if chat:
        out.chat_template = "{% for m in messages %}t1 {{ m['content'] }} t2{% endfor %}"
    return out


TEXT = " ".join(f"t{i}" for i in (5, 17, 42, 8, 93, 11, 60, 3, 27))


# -- config ------------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(CartridgeConfig) == field_defaults(peft.CartridgeConfig)
    assert CartridgeConfig().num_frozen_tokens == peft.CartridgeConfig().num_frozen_tokens == 1
    peft.CartridgeConfig(num_virtual_tokens=6, num_frozen_tokens=2).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, CartridgeConfig) and (loaded.num_virtual_tokens, loaded.num_frozen_tokens) == (6, 2)
    CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=0).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.CartridgeConfig) and (back.num_virtual_tokens, back.num_frozen_tokens) == (5, 0)
    assert str(back.peft_type.value) == "CARTRIDGE"


@pytest.mark.parametrize(("bad", "match", "peft_refuses"), [
    ({"num_frozen_tokens": -1}, r"num_frozen_tokens: expected an integer >= 0, got -1", True),
    ({"num_frozen_tokens": 1.5}, r"num_frozen_tokens: expected an integer >= 0", False),  # peft accepts a float
    ({"num_virtual_tokens": 3, "num_frozen_tokens": 4}, r"num_frozen_tokens: expected an integer <= num_virtual_",
     True),
    ({"num_virtual_tokens": 0}, r"num_virtual_tokens: expected a positive int", False),
])
def test_bad_config_values(bad, match, peft_refuses):
    with pytest.raises(ConfigError, match=match):
        CartridgeConfig(**bad)
    if peft_refuses:
        with pytest.raises(ValueError):
            peft.CartridgeConfig(**bad)


def test_more_frozen_than_virtual_tokens_set_late_is_refused_untouched():
    config = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    config.num_frozen_tokens = 5
    model = FAMILY["llama"].model()
    with pytest.raises(ConfigError, match=r"num_frozen_tokens: expected an integer in \[0, num_virtual_tokens=3\]"):
        peftkit.get_peft_model(model, config)
    assert not any("adapters" in n for n, _ in model.named_modules())
    assert getattr(model, "_peftkit_prompt_hook", None) is None and not model._forward_pre_hooks


def test_model_without_a_kv_cache_is_refused_untouched():
    model = FAMILY["vit"].model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotApplicableError, match="cartridge needs a model with a KV-cache interface"):
        peftkit.get_peft_model(model, CartridgeConfig(num_virtual_tokens=2))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- the adapter against peft's ------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "frozen"), [("llama", 1), ("llama", 0), ("llama", 4), ("gpt2", 2)])
def test_same_init_counts_and_file_state_as_peft(family, frozen):
    theirs, ours = _pair(family, num_frozen_tokens=frozen)
    cfg = ours.peft_config["default"]
    for field in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                  "num_transformer_submodules", "num_frozen_tokens"):
        assert getattr(cfg, field) == getattr(theirs.peft_config["default"], field), field
    # Llama (grouped-query, head_dim 8, 2 key/value heads): d = 16; GPT-2: d = 32; both 2 layers
    d = {"llama": 16, "gpt2": 32}[family]
    assert cfg.token_dim == d
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == (4 - frozen) * 2 * 2 * d
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert list(mine) == list(ref) == ["prompt_embeddings"]
    assert torch.equal(mine["prompt_embeddings"], ref["prompt_embeddings"])  # the same draws, the frozen rows first
    enc, a = theirs.prompt_encoder["default"], _adapter(ours)
    assert (a.frozen_embedding is None) == (enc.frozen_embedding is None) == (frozen == 0)
    assert tuple(a.trainable_embedding.shape) == tuple(enc.trainable_embedding.shape) == (4 - frozen, 4 * d)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits, atol=ATOL, rtol=0)


def test_frozen_rows_never_train_and_gradients_equal_peft():
    theirs, ours = _pair(num_frozen_tokens=2)
    for model in (theirs, ours):
        model.train()
        model(input_ids=_ids(), labels=_ids()).loss.backward()
    enc, a = theirs.prompt_encoder["default"], _adapter(ours)
    assert a.frozen_embedding.grad is None and not a.frozen_embedding.requires_grad
    torch.testing.assert_close(a.trainable_embedding.grad, enc.trainable_embedding.grad, atol=ATOL, rtol=1e-4)
    frozen = a.frozen_embedding.detach().clone()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    assert torch.equal(a.frozen_embedding, frozen) and a.trainable_embedding.grad.abs().sum() > 0
    ours.set_requires_grad("default", True)  # the tuner's trainability pass keeps the frozen rows frozen
    assert not a.frozen_embedding.requires_grad and a.trainable_embedding.requires_grad


@pytest.mark.parametrize(("family", "frozen"), [("llama", 1), ("llama", 0), ("gpt2", 3)])
def test_files_load_both_ways_with_equal_outputs_and_tokens(family, frozen, tmp_path):
    ids = _ids()
    theirs, _ = _pair(family, num_frozen_tokens=frozen)
    _perturb(theirs)  # peft's trainable rows only: the frozen rows keep their random draw
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftkit.PeftModel.from_pretrained(FAMILY[family].model(), tmp_path / "peft")
    enc, a = theirs.prompt_encoder["default"], _adapter(loaded)
    if frozen:
        assert torch.equal(a.frozen_embedding, enc.frozen_embedding)
    assert torch.equal(a.trainable_embedding, enc.trainable_embedding)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as peft
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=ATOL, rtol=0)
    expected = _greedy(theirs, ids)
    for use_cache in (True, False):
        got = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                              do_sample=False, use_cache=use_cache, pad_token_id=0)
        assert torch.equal(got, expected)

    _, ours = _pair(family, seed=9, num_frozen_tokens=frozen)
    _perturb(ours)
    ours.save_pretrained(tmp_path / "peftkit")
    saved = load_file(tmp_path / "peftkit" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == \
        {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    ref = peft.PeftModel.from_pretrained(FAMILY[family].model(), tmp_path / "peftkit").eval()
    torch.testing.assert_close(ref.prompt_encoder["default"].weight, _adapter(ours).weight, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, ours(input_ids=ids).logits, atol=ATOL, rtol=0)
    expected = _greedy(ref, ids)
    for use_cache in (True, False):
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                            do_sample=False, use_cache=use_cache, pad_token_id=0)
        assert torch.equal(got, expected)


def test_loaded_trainable_keeps_the_split(tmp_path):
    _, ours = _pair(num_frozen_tokens=2)
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    again = peftkit.PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path, is_trainable=True)
    a, b = _adapter(ours), _adapter(again)
    assert torch.equal(a.weight, b.weight)
    assert not b.frozen_embedding.requires_grad and b.trainable_embedding.requires_grad
    assert again.get_nb_trainable_parameters()[0] == 2 * 2 * 2 * 16
    # a second load into the same adapter (the parts tied to one buffer) sets both parts again
    again.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    with torch.no_grad():
        b.frozen_embedding.zero_()
        b.trainable_embedding.zero_()
    peftkit.set_peft_model_state_dict(again, {"prompt_embeddings": a.weight.detach().clone()})
    assert torch.equal(b.weight, a.weight)
    with pytest.raises(ValueError, match=r"expected shape \(4, 64\), got \(3, 64\)"):
        b.load_prompt_embeddings(torch.zeros(3, 64))


def test_generate_with_and_without_cache_equals_greedy_loop_on_left_padding():
    _, ours = _pair(num_frozen_tokens=1)
    _perturb(ours)
    ids, mask = _ids(length=6), torch.ones(2, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(STEPS):
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
            logits = ours(input_ids=seq, attention_mask=m, position_ids=pos).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, m.new_ones(2, 1)], dim=1)
    for use_cache in (True, False):
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                            use_cache=use_cache, pad_token_id=0)
        assert torch.equal(got, seq)


# -- initialisation from a KV cache ------------------------------------------------------------------------
def test_prompt_embeddings_from_cache_layout_and_peft():
    base = FAMILY["llama"].model()
    with torch.no_grad():
        cache = base(input_ids=_ids(rows=1, length=7), use_cache=True)["cache"]
    legacy = [(layer.keys, layer.values) for layer in cache.layers]
    ours = prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=5)
    assert torch.equal(ours, peft.prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=5))
    assert torch.equal(prompt_embeddings_from_past_key_values(tuple(legacy), num_virtual_tokens=5), ours)
    # the layout written out: token t, layer l, keys then values, (heads x head_dim) each
    L, heads, hd = len(legacy), legacy[0][0].shape[1], legacy[0][0].shape[3]
    by_hand = torch.stack([torch.stack([kv[i][0, :, t].reshape(heads * hd) for kv in legacy for i in (0, 1)])
                           for t in range(5)]).reshape(5, 2 * L * heads * hd)
    assert torch.equal(ours, by_hand)
    with pytest.raises(ValueError, match="need at least 8 cached tokens"):
        prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=8)
    with pytest.raises(ValueError, match="batch 1"):
        prompt_embeddings_from_past_key_values([(k.repeat(2, 1, 1, 1), v) for k, v in legacy], num_virtual_tokens=2)
    with pytest.raises(TypeError, match="past_key_values"):
        prompt_embeddings_from_past_key_values(3, num_virtual_tokens=2)


@pytest.mark.parametrize("kind", ["cartridge", "prefix"])
def test_initialize_from_cache_equals_peft_and_continues_the_text(kind):
    """Loaded with the cache of a text's first n tokens, the adapted model on the rest of the text gives the
    base model's logits on the whole text (the paper's initialisation)."""
    n, ids = 4, _ids(rows=1, length=9)
    kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": n}
    make = {"cartridge": (peft.CartridgeConfig, CartridgeConfig),
            "prefix": (peft.PrefixTuningConfig, peftkit.PrefixTuningConfig)}[kind]
    theirs = peft.get_peft_model(FAMILY["llama"].model(), make[0](**kw)).eval()
    ours = peftkit.get_peft_model(FAMILY["llama"].model(), make[1](**kw)).eval()
    base = FAMILY["llama"].model()
    with torch.no_grad():
        cache = base(input_ids=ids[:, :n], use_cache=True)["cache"]
        full = base(input_ids=ids).logits
    got = initialize_kv_prefix_from_past_key_values(ours, past_key_values=cache)
    expected = peft.initialize_kv_prefix_from_past_key_values(theirs, past_key_values=cache)
    assert torch.equal(got, expected)
    assert torch.equal(peftkit.get_peft_model_state_dict(ours)["prompt_embeddings"],
                       peft.get_peft_model_state_dict(theirs)["prompt_embeddings"])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids[:, n:]).logits, full[:, n:], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("chat", "max_length"), [(True, None), (False, None), (True, 6), (False, 5)])
def test_initialize_from_text_equals_peft(chat, max_length):
    tok = _tokenizer(chat)
    theirs, ours = _pair(num_frozen_tokens=1)
    kw = dict(text=TEXT, max_length=max_length)
    expected = peft.initialize_kv_prefix_from_text(theirs, tok, **kw)
    got = initialize_kv_prefix_from_text(ours, tok, **kw)
    assert torch.equal(got, expected)
    assert torch.equal(_adapter(ours).weight, theirs.prompt_encoder["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits, atol=ATOL, rtol=0)
    plain = initialize_kv_prefix_from_text(ours, tok, text=TEXT, use_chat_template=False, num_virtual_tokens=4)
    assert torch.equal(plain, peft.initialize_kv_prefix_from_text(theirs, tok, text=TEXT, use_chat_template=False))
    if chat:  # the chat template's first token (t1) leads the prefix: it differs from the plain text's
        assert not torch.equal(got, plain)


def test_initializers_refuse_other_adapters():
    lora = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.LoraConfig(r=2))
    with pytest.raises(ValueError, match="must be a CARTRIDGE or PREFIX_TUNING adapter"):
        initialize_kv_prefix_from_past_key_values(lora, past_key_values=[])
    proj = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.PrefixTuningConfig(
        num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8))
    with pytest.raises(ValueError, match="prefix_projection=True"):
        initialize_kv_prefix_from_text(proj, _tokenizer(False), text=TEXT)


# -- composition -----------------------------------------------------------------------------------------
def _saved_cartridges(tmp_path, sizes=((3, 1), (2, 0))):
    paths = []
    for i, (n, f) in enumerate(sizes):
        theirs, _ = _pair(seed=20 + i, num_virtual_tokens=n, num_frozen_tokens=f)
        _perturb(theirs, seed=i)
        theirs.save_pretrained(tmp_path / f"c{i}")
        paths.append(tmp_path / f"c{i}")
    return paths


@pytest.mark.parametrize("safe", [True, False])
def test_compose_gives_peft_files_and_outputs(tmp_path, safe):
    paths = _saved_cartridges(tmp_path)
    peft.compose_cartridge_adapters(paths, output_path=tmp_path / "peft", safe_serialization=safe)
    compose_cartridge_adapters(paths, output_path=tmp_path / "ours", safe_serialization=safe)
    name = "adapter_model.safetensors" if safe else "adapter_model.bin"
    read = load_file if safe else (lambda p: torch.load(p, weights_only=True))
    a, b = read(tmp_path / "peft" / name), read(tmp_path / "ours" / name)
    assert list(a) == list(b) == ["prompt_embeddings"] and torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
    parts = [load_file(p / "adapter_model.safetensors")["prompt_embeddings"] for p in paths]
    assert torch.equal(b["prompt_embeddings"], torch.cat(parts))
    cfg_a, cfg_b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    cfg_a.pop("peft_version"), cfg_b.pop("peft_version")
    assert cfg_a == cfg_b and (cfg_b["num_virtual_tokens"], cfg_b["num_frozen_tokens"]) == (5, 1)
    ref = peft.PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path / "peft").eval()
    ours = peftkit.PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, atol=ATOL, rtol=0)


def test_compose_refuses_bad_input(tmp_path):
    paths = _saved_cartridges(tmp_path)
    with pytest.raises(ValueError, match="at least 2 adapters"):
        compose_cartridge_adapters(paths[:1], output_path=tmp_path / "x")
    prefix = peftkit.get_peft_model(FAMILY["llama"].model(), peftkit.PrefixTuningConfig(num_virtual_tokens=2))
    prefix.save_pretrained(tmp_path / "prefix")
    with pytest.raises(ValueError, match="is not a CARTRIDGE adapter"):
        compose_cartridge_adapters([paths[0], tmp_path / "prefix"], output_path=tmp_path / "x")
    gpt2 = peftkit.get_peft_model(FAMILY["gpt2"].model(), CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="attribute 'token_dim'"):
        compose_cartridge_adapters([paths[0], tmp_path / "gpt2"], output_path=tmp_path / "x")
    assert not (tmp_path / "x").exists()
