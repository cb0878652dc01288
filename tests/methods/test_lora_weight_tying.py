"""``LoraConfig(ensure_weight_tying=True)`` on a tied Llama: peft's config rewrite and warnings, a true tie (the
LM head's adapter is the input embedding's: one tensor per factor), peft's file keys, files that load both ways
with peft, merges that add the delta once, and a tie that training keeps."""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterLayer, LoraConfig
from peftkit.config import ConfigError
from peftkit.methods.lora.tied import TiedLoraAdapter

from ..families import Family
from ..parity import assert_loads_both_ways, perturb

V, D, R, LAYERS = 99, 32, 2, 2  # the tiny Llama's vocabulary, width, the rank used here, its layers
Q_PROJ = LAYERS * R * (D + D)  # LoRA on every q_proj
EMBEDDING = R * (V + D)  # LoRA on the embedding (lora_embedding_A (r, V), lora_embedding_B (d, r))

CASES = {  # peft's probe cases: the embedding saved in full or adapted, named directly, through lm_head, or by regex
    "mts": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "mts_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "tm": dict(target_modules=["q_proj", "embed_tokens"]),
    "tm_head": dict(target_modules=["q_proj", "lm_head"]),
    "tm_re": dict(target_modules=r".*(q_proj|embed_tokens)"),
}
TARGETED = ["tm", "tm_head", "tm_re"]


def llama_family(tie: bool = True) -> Family:
    from peftkit import tiny_models

    return Family(f"llama-tie{tie}", lambda: tiny_models.llama(tie_word_embeddings=tie),
                  lambda: {"input_ids": torch.randint(0, V, (2, 7))}, lambda o: o.logits)


FAMILY = llama_family()


def configs(case: str, **extra) -> tuple[peft.LoraConfig, LoraConfig]:
    kw = dict(r=R, ensure_weight_tying=True, **CASES[case], **extra)
    return peft.LoraConfig(**kw), LoraConfig(**kw)


def pair(case: str, **extra) -> tuple[nn.Module, nn.Module]:
    ref_cfg, our_cfg = configs(case, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(FAMILY.model(), ref_cfg), peftkit.get_peft_model(FAMILY.model(), our_cfg)


def file_keys(folder) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}


def caught(build) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build()
    return sorted({str(w.message) for w in seen if "tie" in str(w.message)})


def head_and_embedding(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = model.base_model.model
    return inner.lm_head, inner.model.embed_tokens


# -- config ---------------------------------------------------------------------------------------------------
def test_field_is_peft_s_and_must_be_a_bool():
    assert LoraConfig().ensure_weight_tying is False and peft.LoraConfig().ensure_weight_tying is False
    with pytest.raises(ConfigError, match="ensure_weight_tying"):
        LoraConfig(ensure_weight_tying="yes")


@pytest.mark.parametrize("case", list(CASES))
def test_config_rewrite_is_peft_s(case):
    theirs, ours = pair(case)
    ref, mine = theirs.peft_config["default"], ours.peft_config["default"]
    assert mine.target_modules == ref.target_modules
    assert mine.modules_to_save == ref.modules_to_save
    assert mine.modules_to_tie == ref.modules_to_tie and mine.target_modules_to_tie == ref.target_modules_to_tie
    assert (mine.modules_to_tie or mine.target_modules_to_tie) == {"lm_head"}


@pytest.mark.parametrize(("tie", "extra"), [
    (False, dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)),  # nothing tied
    (True, dict(target_modules=["q_proj"], ensure_weight_tying=True)),  # nothing tied among the targets
    (True, dict(target_modules=["q_proj", "embed_tokens"])),  # a tied layer adapted without ensure_weight_tying
    (True, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
])
def test_warnings_are_peft_s(tie, extra):
    family = llama_family(tie)
    ours = caught(lambda: peftkit.get_peft_model(family.model(), LoraConfig(r=R, **extra)))
    theirs = caught(lambda: peft.get_peft_model(family.model(), peft.LoraConfig(r=R, **extra)))
    assert ours and ours == theirs


def test_refusals_name_the_field_before_the_model_changes():
    model = FAMILY.model()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="ensure_weight_tying.*input embedding 'model.embed_tokens' is not adapted"):
        peftkit.get_peft_model(model, LoraConfig(r=R, ensure_weight_tying=True, target_modules=["q_proj", "lm_head"],
                                                 exclude_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="ensure_weight_tying.*use_dora"):
        peftkit.get_peft_model(model, LoraConfig(r=R, ensure_weight_tying=True, use_dora=True,
                                                 target_modules=["q_proj", "embed_tokens"]))
    assert {n: type(m) for n, m in model.named_modules()} == before


# -- the tie --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", TARGETED)
def test_the_head_reads_the_embedding_factors(case):
    _, ours = pair(case)
    head, emb = head_and_embedding(ours)
    tied, source = head.adapters["default"], emb.adapters["default"]
    assert isinstance(head, AdapterLayer) and isinstance(tied, TiedLoraAdapter) and tied.tied
    assert dict(tied.named_parameters()) == {}
    assert tied.lora_A.data_ptr() == source.lora_B.data_ptr() and torch.equal(tied.lora_A, source.lora_B.t())
    assert tied.lora_B.data_ptr() == source.lora_A.data_ptr() and torch.equal(tied.lora_B, source.lora_A.t())
    assert torch.equal(head.lora_A["default"].weight, source.lora_B.t())  # peft's surface reads the views too
    # one tensor per factor: counted once (peft counts the head's factors again: 2 r (V + d) more)
    assert ours.get_nb_trainable_parameters()[0] == Q_PROJ + EMBEDDING
    theirs, _ = pair(case)
    assert theirs.get_nb_trainable_parameters()[0] == Q_PROJ + 2 * EMBEDDING


@pytest.mark.parametrize("case", ["mts", "mts_head"])
def test_the_head_copy_is_the_embedding_copy(case):
    theirs, ours = pair(case)
    head, emb = head_and_embedding(ours)
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    assert head.original_module.weight is emb.original_module.weight
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == Q_PROJ + V * D


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_are_peft_s(tmp_path, case):
    theirs, ours = pair(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
        ours.save_pretrained(tmp_path / "peftkit")
    keys = file_keys(tmp_path / "peftkit")
    assert keys == file_keys(tmp_path / "peft")
    assert any(k.startswith("base_model.model.lm_head.") for k in keys)
    state = load_file(tmp_path / "peftkit" / "adapter_model.safetensors")
    head, emb = "base_model.model.lm_head.", "base_model.model.model.embed_tokens."
    if case.startswith("mts"):
        assert torch.equal(state[head + "weight"], state[emb + "weight"])
    else:
        assert torch.equal(state[head + "lora_A.weight"], state[emb + "lora_embedding_B"].t())
        assert torch.equal(state[head + "lora_B.weight"], state[emb + "lora_embedding_A"].t())


@pytest.mark.parametrize("case", ["mts", "tm", "tm_re"])
def test_files_load_both_ways_with_peft(tmp_path, case):
    ref_cfg, our_cfg = configs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, loaded = assert_loads_both_ways(FAMILY, ref_cfg, our_cfg, tmp_path, train=lambda m, f: perturb(m))
    if case != "mts":
        mine = ours.base_model.model.lm_head.adapters["default"]
        assert isinstance(mine, TiedLoraAdapter) and mine.tied
        back = peftkit.PeftModel.from_pretrained(FAMILY.model(), tmp_path / "peft")  # peft's file, loaded here
        head, emb = head_and_embedding(back)
        assert head.adapters["default"].tied and dict(head.adapters["default"].named_parameters()) == {}
        theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert torch.equal(emb.adapters["default"].lora_A, theirs["base_model.model.model.embed_tokens.lora_embedding_A"])


# -- merging --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mts", "tm", "tm_re"])
def test_merge_adds_the_delta_once_and_unmerges_bit_exactly(case):
    _, ours = pair(case)
    perturb(ours)
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if ".adapters." not in k}
    with torch.no_grad():
        unmerged = FAMILY.run(ours)
        ours.merge_adapter()
        torch.testing.assert_close(FAMILY.run(ours), unmerged, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before), "unmerge is not bit-exact"
    with torch.no_grad():
        plain = ours.merge_and_unload()
        torch.testing.assert_close(FAMILY.run(plain), unmerged, atol=1e-5, rtol=1e-5)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied


# -- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mts", "tm"])
def test_training_keeps_the_tie_with_one_optimizer_state(tmp_path, case):
    _, ours = pair(case)
    ours.train()
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    start = {id(p): p.detach().clone() for p in params}
    for _ in range(3):
        opt.zero_grad()
        FAMILY.run(ours).float().pow(2).mean().backward()
        opt.step()
    assert len(opt.state) == len(params)
    head, emb = head_and_embedding(ours)
    if case == "mts":
        moved = emb.modules_to_save["default"].weight
        assert head.modules_to_save["default"].weight is moved
    else:
        tied, source = head.adapters["default"], emb.adapters["default"]
        moved = source.lora_A
        assert torch.equal(tied.lora_A, source.lora_B.t()) and torch.equal(tied.lora_B, source.lora_A.t())
    assert not torch.equal(moved, start[id(moved)]), "the shared tensor did not train"
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    head_key = "base_model.model.lm_head." + ("weight" if case == "mts" else "lora_B.weight")
    emb_key = "base_model.model.model.embed_tokens." + ("weight" if case == "mts" else "lora_embedding_A")
    assert torch.equal(state[head_key], state[emb_key] if case == "mts" else state[emb_key].t())
