"""Textual inversion: diffusers' load_textual_inversion reads the saved file and gives the same text-encoder output,
initialisation, exact parameter counts, peftkit's own file round trip, and bad input leaving everything untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.textual_inversion import (TextualInversionConfig, add_textual_inversion, multi_vector_prompt,
                                               save_textual_inversion)

WORDS = ["a", "cat", "dog", "on", "mat", "photo", "of", "the"]
PROMPT = "a photo of <cat-toy> on the mat"


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a few whole words (letters plus the merges that join each word)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:
        piece = w[0]
        for i, c in enumerate(w[1:], 1):
            nxt = c + ("</w>" if i == len(w) - 1 else "")
            merges.append((piece, nxt))
            piece += nxt
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def text_encoder(tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def pipeline(tokenizer, encoder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def encode(tokenizer, encoder, prompt):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, encoder(input_ids=ids).last_hidden_state


@torch.no_grad()
def perturb(model):
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_diffusers_load_textual_inversion_gives_the_same_encoder_output(tmp_path, num_vectors):
    tok = clip_tokenizer()
    encoder = text_encoder(tok)
    pipe = pipeline(copy.deepcopy(tok), copy.deepcopy(encoder))  # the plain encoder, as diffusers would get it
    config = TextualInversionConfig(placeholder_token="<cat-toy>", initializer_token="cat", num_vectors=num_vectors)
    model = add_textual_inversion(encoder, tok, config)
    assert config.token_indices == list(range(len(tok) - num_vectors, len(tok)))
    perturb(model)
    ids, ours = encode(tok, model, multi_vector_prompt(PROMPT, "<cat-toy>", num_vectors))
    assert set(config.token_indices) <= set(ids.flatten().tolist())
    with model.disable_adapter():
        assert not torch.allclose(encode(tok, model, multi_vector_prompt(PROMPT, "<cat-toy>", num_vectors))[1], ours)

    file = save_textual_inversion(model, tok, tmp_path)
    assert file.endswith("learned_embeds.safetensors")
    saved = load_file(file)
    assert list(saved) == ["<cat-toy>"] and saved["<cat-toy>"].shape == (num_vectors, 32)

    pipe.load_textual_inversion(str(tmp_path))
    prompt = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    theirs_ids, theirs = encode(pipe.tokenizer, pipe.text_encoder, prompt)
    assert torch.equal(theirs_ids, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_rows_start_at_the_initializer_and_only_they_train():
    tok = clip_tokenizer()
    encoder = text_encoder(tok)
    cat = tok.convert_tokens_to_ids("cat</w>")
    rows_before = encoder.get_input_embeddings().weight.detach().clone()
    model = add_textual_inversion(encoder, tok, TextualInversionConfig(placeholder_token="<x>", initializer_token="cat",
                                                                       num_vectors=2))
    weight = model.get_base_model().get_input_embeddings().base_layer.weight
    assert weight.shape == (rows_before.shape[0] + 2, 32)
    assert torch.equal(weight[: rows_before.shape[0]], rows_before)  # the old rows untouched
    delta = next(p for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(delta, rows_before[cat].expand(2, -1))
    assert torch.equal(weight[-2:], rows_before[cat].expand(2, -1))  # the base reads <x> as "cat": starts at base
    assert model.get_nb_trainable_parameters()[0] == 2 * 32
    model.train()
    ids = tok(multi_vector_prompt("a <x> on the mat", "<x>", 2), return_tensors="pt").input_ids
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained == [n for n, p in model.named_parameters() if p.requires_grad] and delta.grad.abs().sum() > 0


def test_adapter_file_round_trip_and_merged_encoder_save_the_same_rows(tmp_path):
    tok = clip_tokenizer()
    encoder = text_encoder(tok)
    fresh = copy.deepcopy(encoder)
    model = add_textual_inversion(encoder, tok, TextualInversionConfig(placeholder_token="<x>", num_vectors=2))
    perturb(model)
    ids, expected = encode(tok, model, "a <x> <x>_1 cat")
    model.save_pretrained(tmp_path / "adapter")
    first = load_file(save_textual_inversion(model, tok, tmp_path / "a.safetensors"))
    loaded = peftkit.PeftModel.from_pretrained(fresh, tmp_path / "adapter")  # the embedding grows on load
    assert torch.equal(encode(tok, loaded, "a <x> <x>_1 cat")[1], expected)
    plain = model.merge_and_unload()
    second = load_file(save_textual_inversion(plain, tok, tmp_path / "b.safetensors", placeholder_token="<x>"))
    assert torch.equal(first["<x>"], second["<x>"])


def _state(tok, encoder):
    return len(tok), {k: v.clone() for k, v in encoder.state_dict().items()}


def _same(state, tok, encoder):
    n, sd = state
    assert len(tok) == n and sd.keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in sd.items())


@pytest.mark.parametrize("kwargs,field", [
    ({"placeholder_token": "cat"}, "placeholder_token"),  # "cat" is a vocabulary entry
    ({"placeholder_token": "<x>", "num_vectors": 2, "_taken": "<x>_1"}, "placeholder_token"),
    ({"placeholder_token": "<x>", "initializer_token": "cat dog"}, "initializer_token"),
    ({"placeholder_token": "<x>", "initializer_token": "zq"}, "initializer_token"),  # two BPE pieces
    ({"placeholder_token": "<x>", "target_modules": ["fc1"]}, "target_modules"),
])
def test_bad_input_names_the_field_and_changes_nothing(kwargs, field):
    tok = clip_tokenizer()
    kwargs = dict(kwargs)
    taken = kwargs.pop("_taken", None)
    if taken:
        tok.add_tokens([taken])
    encoder = text_encoder(tok)
    state = _state(tok, encoder)
    if kwargs["placeholder_token"] == "cat":
        kwargs["placeholder_token"] = "cat</w>"
    with pytest.raises(ConfigError, match=rf"TextualInversionConfig\.{field}"):
        add_textual_inversion(encoder, tok, TextualInversionConfig(**kwargs))
    _same(state, tok, encoder)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in encoder.modules())


@pytest.mark.parametrize("kwargs,field", [
    ({"num_vectors": 0}, "num_vectors"),
    ({"num_vectors": 2, "token_indices": [1]}, "num_vectors"),
    ({"token_indices": [-1]}, "token_indices"),
    ({"placeholder_token": ""}, "placeholder_token"),
    ({"initializer_token": 3}, "initializer_token"),
    ({"initializer_index": -2}, "initializer_index"),
])
def test_bad_config_values(kwargs, field):
    with pytest.raises(ConfigError, match=rf"TextualInversionConfig\.{field}"):
        TextualInversionConfig(**kwargs)


def test_token_indices_without_tokenizer_and_errors_before_any_change():
    tok = clip_tokenizer()
    encoder = text_encoder(tok)
    state = _state(tok, encoder)
    with pytest.raises(ConfigError, match=r"TextualInversionConfig\.token_indices"):
        peftkit.get_peft_model(encoder, TextualInversionConfig(placeholder_token="<x>"))
    with pytest.raises(ConfigError, match=r"TextualInversionConfig\.initializer_index"):
        peftkit.get_peft_model(encoder, TextualInversionConfig(token_indices=[len(tok)], initializer_index=10_000))
    _same(state, tok, encoder)
    model = peftkit.get_peft_model(encoder, TextualInversionConfig(token_indices=[len(tok) + 1], num_vectors=1,
                                                                   initializer_index=5))
    weight = model.get_base_model().get_input_embeddings().base_layer.weight
    assert weight.shape[0] == len(tok) + 2 and torch.equal(weight[-1], weight[5])
