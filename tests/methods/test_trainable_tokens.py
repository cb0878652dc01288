"""Trainable tokens (TrainableTokensConfig, LoraConfig.trainable_token_indices): config checks, the numerics,
tied embeddings, a resized vocabulary, and files that load both ways with Hugging Face PEFT."""

from __future__ import annotations

import dataclasses
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterLayer, TrainableTokensConfig
from peftkit.config import ConfigError
from peftkit.methods.trainable_tokens import TrainableTokensAdapter

from ..families import FAMILY, Family
from ..parity import assert_loads_both_ways, assert_merges_like_peft, assert_same_trainable_state, perturb

D = 32  # the tiny Llama's hidden size
TOKENS = list(range(0, 99, 3))  # 33 tokens: every input row of the tiny families holds some
EMB = "base_model.model.model.embed_tokens"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def llama_family(tie: bool = False, vocab: int | None = None) -> Family:
    """The tiny Llama (optionally tied, optionally resized to ``vocab`` rows before any adapter)."""
    from peftkit import tiny_models

    def build() -> nn.Module:
        model = tiny_models.llama(tie_word_embeddings=tie)
        if vocab is not None:
            model.resize_token_embeddings(vocab)
        return model

    hi = vocab or 99
    return Family(f"llama-tie{tie}", build, lambda: {"input_ids": torch.randint(0, hi, (2, 7))}, lambda o: o.logits)


def keys(folder) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}


def perturb_tokens(model: nn.Module) -> None:
    perturb(model, only="trainable_tokens_delta")


# -- config -------------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft(tmp_path):
    ours = {f.name for f in dataclasses.fields(TrainableTokensConfig)}
    assert ours == {f.name for f in dataclasses.fields(peft.TrainableTokensConfig)}
    a, b = TrainableTokensConfig(), peft.TrainableTokensConfig()
    assert (a.token_indices, a.target_modules, a.init_weights) == (b.token_indices, b.target_modules, b.init_weights)
    assert a.peft_type == "TRAINABLE_TOKENS" and a.token_indices == [] and a.init_weights is True
    TrainableTokensConfig(token_indices=[4, 2], init_weights=False).save_pretrained(tmp_path)
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.TrainableTokensConfig) and ref.token_indices == [4, 2] and ref.init_weights is False
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, TrainableTokensConfig) and back.token_indices == [4, 2]


@pytest.mark.parametrize(("value", "expected"), [
    ([1, -2], "non-negative token indices, got -2 at position 1"),
    ([1, 2.0], r"token indices as ints, got 2.0 \(float\) at position 1"),
    ([True], r"token indices as ints, got True \(bool\)"),
    (["3"], r"token indices as ints, got '3' \(str\)"),
    ([3, 3], r"distinct token indices, got \[3\] more than once"),
    (5, "a list of token indices"),
])
def test_bad_token_indices_name_the_field(value, expected):
    with pytest.raises(ConfigError, match=rf"TrainableTokensConfig\.token_indices: expected {expected}"):
        TrainableTokensConfig(token_indices=value)
    with pytest.raises(ConfigError, match=r"LoraConfig\.trainable_token_indices: expected"):
        peftkit.LoraConfig(trainable_token_indices=value)
    with pytest.raises(ConfigError, match=r"LoraConfig\.trainable_token_indices\['embed_tokens'\]: expected"):
        peftkit.LoraConfig(trainable_token_indices={"embed_tokens": value})


@pytest.mark.parametrize("make", [
    lambda: TrainableTokensConfig(token_indices=[3, 99, 150]),
    lambda: peftkit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 99, 150]),
    lambda: peftkit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [99]}),
])
def test_indices_outside_the_vocabulary_are_refused_and_the_model_untouched(make):
    base = FAMILY["llama"].model()
    before = {n: p.clone() for n, p in base.named_parameters()}
    field = "token_indices" if isinstance(make(), TrainableTokensConfig) else "trainable_token_indices"
    with pytest.raises(ConfigError, match=rf"\.{field}: expected token indices below 99 .*model\.embed_tokens.*"
                                          r"got \[99(, 150)?\] outside the vocabulary"):
        peftkit.get_peft_model(base, make())
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    after = dict(base.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_empty_indices_are_refused_at_injection():
    with pytest.raises(ConfigError, match=r"token_indices: expected at least one token index"):
        peftkit.get_peft_model(FAMILY["llama"].model(), TrainableTokensConfig())


def test_no_input_embedding_is_not_applicable():
    from peftkit.targeting import NotApplicableError

    with pytest.raises(NotApplicableError, match="no input token embedding"):
        peftkit.get_peft_model(FAMILY["vit"].model(), TrainableTokensConfig(token_indices=[1]))


# -- the method on its own ------------------------------------------------------------------------------------
def test_only_the_chosen_rows_change_and_the_file_holds_only_them(tmp_path):
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), TrainableTokensConfig(token_indices=[5, 1, 7]))
    assert model.peft_config["default"].target_modules == "model.embed_tokens"
    assert model.get_nb_trainable_parameters()[0] == 3 * D
    perturb_tokens(model)
    delta = model.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta
    emb = model.base_model.model.model.embed_tokens
    ids = torch.tensor([[5, 2, 7, 1, 0]])
    rows = emb(ids)[0]
    torch.testing.assert_close(rows[[0, 2, 3]], delta[[0, 2, 1]], atol=0, rtol=0)  # the new values, in index order
    torch.testing.assert_close(rows[[1, 4]], emb.base_layer.weight[[2, 0]], atol=0, rtol=0)  # the rest: the base
    model.save_pretrained(tmp_path)
    assert keys(tmp_path) == {f"{EMB}.trainable_tokens_delta": (3, D)}
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert 3 * D * 4 < size < 3 * D * 4 + 400  # k d floats plus the header, not the 99 x 32 embedding


def test_merge_unmerge_disable_delete():
    family = FAMILY["llama"]
    base = family.model()
    original = {n: p.clone() for n, p in base.named_parameters()}
    base_out = family.run(base)
    model = peftkit.get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS))
    perturb_tokens(model)
    out = family.run(model)
    assert (out - base_out).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(family.run(model), base_out, atol=0, rtol=0)
    model.merge_adapter()
    w = model.base_model.model.model.embed_tokens.base_layer.weight
    changed = (w != original["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert changed == TOKENS  # exactly the chosen rows were written
    torch.testing.assert_close(family.run(model), out, atol=1e-6, rtol=0)
    model.unmerge_adapter()
    assert torch.equal(w, original["model.embed_tokens.weight"])  # bit for bit
    model.delete_adapter("default")
    assert not any(isinstance(m, (AdapterLayer, TrainableTokensAdapter)) for m in base.modules())
    torch.testing.assert_close(family.run(base), base_out, atol=0, rtol=0)


def test_forward_and_gradients_equal_peft():
    family = llama_family()
    ours = peftkit.get_peft_model(family.model(), TrainableTokensConfig(token_indices=TOKENS))
    ref = peft.get_peft_model(family.model(), peft.TrainableTokensConfig(token_indices=TOKENS))
    perturb_tokens(ours)
    ref_delta = ref.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    our_delta = ours.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta
    with torch.no_grad():
        ref_delta.copy_(our_delta)
    for m in (ours, ref):
        family.run(m).pow(2).mean().backward()
    torch.testing.assert_close(family.run(ours), family.run(ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(our_delta.grad, ref_delta.grad, atol=1e-7, rtol=1e-5)
    assert our_delta.grad.abs().sum() > 0


@pytest.mark.parametrize("tie", [False, True])
def test_files_load_both_ways_with_peft(tmp_path, tie):
    family = llama_family(tie)
    cfg = dict(token_indices=TOKENS)
    ours, theirs = assert_loads_both_ways(family, peft.TrainableTokensConfig(**cfg), TrainableTokensConfig(**cfg),
                                          tmp_path, train=lambda m, f: perturb_tokens(m))
    expected = {f"{EMB}.trainable_tokens_delta": (len(TOKENS), D)}
    if tie:  # peft writes the tied LM head's (shared) tensor too
        expected["base_model.model.lm_head.trainable_tokens_delta"] = (len(TOKENS), D)
    assert keys(tmp_path / "peftkit") == keys(tmp_path / "peft") == expected
    ref = peft.get_peft_model(family.model(), peft.TrainableTokensConfig(**cfg))
    assert_same_trainable_state(ref, ours)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters() == (
        len(TOKENS) * D, ref.get_nb_trainable_parameters()[1])


def test_tied_lm_head_follows_the_embedding_and_merges_like_peft():
    family = llama_family(tie=True)
    ours = peftkit.get_peft_model(family.model(), TrainableTokensConfig(token_indices=TOKENS))
    theirs = peft.get_peft_model(family.model(), peft.TrainableTokensConfig(token_indices=TOKENS))
    perturb_tokens(ours)
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].copy_(
            ours.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta)
    head = ours.base_model.model.lm_head
    assert isinstance(head, AdapterLayer) and head.adapters["default"].tied
    assert head.adapters["default"].trainable_tokens_delta is None  # one tensor: the embedding adapter's
    # the LM head's logits of the chosen tokens are x . (new row)
    x = torch.randn(3, D)
    delta = ours.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta
    torch.testing.assert_close(head(x)[:, TOKENS], x @ delta.t(), atol=1e-6, rtol=0)
    torch.testing.assert_close(head(x)[:, 1], x @ head.base_layer.weight[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    changed = assert_merges_like_peft(family, theirs, ours)
    assert changed == ["model.embed_tokens.weight", "lm_head.weight"]


def test_gpt2_and_t5_tie_every_alias_like_peft(tmp_path):
    for name in ("gpt2", "t5"):
        family = FAMILY[name]
        cfg = dict(token_indices=TOKENS)
        ours, _ = assert_loads_both_ways(family, peft.TrainableTokensConfig(**cfg), TrainableTokensConfig(**cfg),
                                         tmp_path / name, train=lambda m, f: perturb_tokens(m))
        assert keys(tmp_path / name / "peftkit") == keys(tmp_path / name / "peft")
        assert ours.get_nb_trainable_parameters()[0] == len(TOKENS) * D


# -- beside LoRA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_lora_with_trainable_token_indices_loads_both_ways(tmp_path, tie):
    family = llama_family(tie)
    cfg = dict(r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKENS)
    ours, _ = assert_loads_both_ways(family, peft.LoraConfig(**cfg), peftkit.LoraConfig(**cfg), tmp_path,
                                     train=lambda m, f: perturb(m))
    file = keys(tmp_path / "peftkit")
    assert file == keys(tmp_path / "peft")
    assert file[f"{EMB}.token_adapter.trainable_tokens_delta"] == (len(TOKENS), D)
    assert not any("lm_head" in k for k in file)  # the tied head saves nothing of its own (peft's wrapper)
    assert len(file) == 1 + 2 * 2 * 2  # the token rows + A and B of two targets in two layers
    ref = peft.get_peft_model(family.model(), peft.LoraConfig(**cfg))
    assert_same_trainable_state(ref, ours)
    assert ours.get_nb_trainable_parameters()[0] == len(TOKENS) * D + 2 * (2 * (32 + 32) + 2 * (32 + 16))  # r = 2
    if tie:
        assert ours.base_model.model.lm_head.adapters["default"].tied


def test_lora_dict_form_and_conflicts():
    family = llama_family()
    cfg = peftkit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2],
                                                                                       "lm_head": [4]})
    model = peftkit.get_peft_model(family.model(), cfg)
    state = {k: tuple(v.shape) for k, v in peftkit.get_peft_model_state_dict(model).items() if "token" in k}
    assert state == {f"{EMB}.token_adapter.trainable_tokens_delta": (2, D),
                     "base_model.model.lm_head.token_adapter.trainable_tokens_delta": (1, D)}
    ref = peft.get_peft_model(family.model(), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={
        "embed_tokens": [1, 2], "lm_head": [4]}))
    assert_same_trainable_state(ref, model)
    base = family.model()
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                        trainable_token_indices={"embed_tokens": [1]}))
    with pytest.raises(ValueError, match="also in target_modules"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["embed_tokens"],
                                                        trainable_token_indices=[1]))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


# -- a resized vocabulary -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_new_tokens_of_a_resized_vocabulary_train_and_load_both_ways(tmp_path, tie):
    family = llama_family(tie, vocab=120)
    new = list(range(99, 120))  # the rows resize_token_embeddings added
    ours, _ = assert_loads_both_ways(family, peft.TrainableTokensConfig(token_indices=new),
                                     TrainableTokensConfig(token_indices=new), tmp_path,
                                     train=lambda m, f: perturb_tokens(m))
    assert keys(tmp_path / "peftkit")[f"{EMB}.trainable_tokens_delta"] == (21, D)
    assert keys(tmp_path / "peftkit") == keys(tmp_path / "peft")
    with pytest.raises(ConfigError, match="below 120"):
        peftkit.get_peft_model(family.model(), TrainableTokensConfig(token_indices=[120]))
