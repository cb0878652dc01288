"""Load and save options peft accepts are honoured, never silently dropped (issue 21 item 7):
``torch_device``, ``key_mapping`` and ``ephemeral_gpu_offload`` of ``PeftModel.from_pretrained`` /
``load_adapter``, and ``save_embedding_layers`` of ``get_peft_model_state_dict`` / ``save_pretrained``.
The real peft 0.21.2 is the reference where it supports the option."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model

CUDA = torch.cuda.is_available()
EMBED = "base_model.model.model.embed_tokens"


# -- models ------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """``<part>.proj`` then ``head``: the same weights under another module name for ``part="encoder"``."""

    def __init__(self, part: str = "enc") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.part = part
        self.add_module(part, nn.ModuleDict({"proj": nn.Linear(8, 8)}))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, self.part)["proj"](x))


class Renamed(Net):
    """A model whose class carries the checkpoint renames (transformers' ``_checkpoint_conversion_mapping``)."""

    _checkpoint_conversion_mapping = {r"^enc\.": "encoder."}

    def __init__(self) -> None:
        super().__init__("encoder")


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def _net_folder(tmp_path, **config):
    """An adapter saved from ``Net("enc")`` with random A and B, and that model's output."""
    torch.manual_seed(3)
    source = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False, **config))
    source.save_pretrained(tmp_path)
    with torch.no_grad():
        return source(X)


def _llama(vocab: int = 64, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab,
                                        tie_word_embeddings=tie)).eval()


IDS = torch.tensor([[1, 5, 9, 3, 60]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _pair(targets, base_model_name_or_path=None, **config):
    """The same LoRA (base and random A, B) in peftkit and in peft."""
    ours = get_peft_model(_llama(**config), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    theirs = peft.get_peft_model(_llama(**config), peft.LoraConfig(r=2, target_modules=targets,
                                                                   init_lora_weights=False))
    for model in (ours, theirs):  # (peft's get_peft_model takes the name from the model: set it afterwards)
        model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    peft.set_peft_model_state_dict(theirs, peftkit.get_peft_model_state_dict(ours, save_embedding_layers=False))
    return ours, theirs


def _base_keys(state):
    return sorted(k for k in state if "lora_" not in k)


# -- key_mapping ----------------------------------------------------------------------------------------------

MAPPING = {r"^enc\.": "encoder.", r"proj": "no_such_module"}  # the first pattern that matches wins


def test_key_mapping_renames_the_file_keys_in_from_pretrained_and_load_adapter(tmp_path):
    expected = _net_folder(tmp_path)
    loaded = PeftModel.from_pretrained(Net("encoder"), tmp_path, key_mapping=MAPPING)
    reference = peft.PeftModel.from_pretrained(Net("encoder"), tmp_path, key_mapping=MAPPING)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(reference(X), expected, atol=1e-5, rtol=0)

    ours = get_peft_model(Net("encoder"), LoraConfig(r=2, target_modules=["proj"]))
    ours.load_adapter(tmp_path, "other", key_mapping=MAPPING)
    ours.set_adapter("other")
    theirs = peft.get_peft_model(Net("encoder"), peft.LoraConfig(r=2, target_modules=["proj"]))
    theirs.load_adapter(tmp_path, "other", key_mapping=MAPPING)
    theirs.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs(X), expected, atol=1e-5, rtol=0)


def test_from_pretrained_applies_the_models_checkpoint_conversion_mapping(tmp_path):
    expected = _net_folder(tmp_path)
    loaded = PeftModel.from_pretrained(Renamed(), tmp_path)
    reference = peft.PeftModel.from_pretrained(Renamed(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(reference(X), expected, atol=1e-5, rtol=0)
    # an explicit mapping replaces the model's (here: none at all, so the old name cannot load)
    with pytest.raises(ValueError, match="enc.proj"):
        PeftModel.from_pretrained(Renamed(), tmp_path, key_mapping={"^x": "y"})


# -- torch_device ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="a device that does not exist here")
def test_torch_device_the_machine_lacks_is_refused_as_by_peft(tmp_path):
    _net_folder(tmp_path)
    with pytest.raises(ValueError, match="torch_device='cuda'"):
        PeftModel.from_pretrained(Net(), tmp_path, torch_device="cuda")
    with pytest.raises(Exception):  # peft: torch's or safetensors' error
        peft.PeftModel.from_pretrained(Net(), tmp_path, torch_device="cuda")
    ours = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="torch_device='cuda'"):
        ours.load_adapter(tmp_path, "other", torch_device="cuda")
    assert list(ours.peft_config) == ["default"]  # nothing changed
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(Exception):
        theirs.load_adapter(tmp_path, "other", torch_device="cuda")


def test_torch_device_not_a_device_is_refused(tmp_path):
    _net_folder(tmp_path)
    with pytest.raises(ValueError, match="torch_device='gpu0'"):
        PeftModel.from_pretrained(Net(), tmp_path, torch_device="gpu0")
    with pytest.raises(Exception):
        peft.PeftModel.from_pretrained(Net(), tmp_path, torch_device="gpu0")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("base_device,torch_device", [("cpu", "cuda"), ("cuda", "cpu")])
def test_torch_device_stages_the_tensors_and_the_adapter_stays_with_its_base_layer(tmp_path, monkeypatch,
                                                                                  base_device, torch_device):
    expected = _net_folder(tmp_path)
    from peftkit import checkpoint

    seen = []
    load_state = checkpoint.load_state
    monkeypatch.setattr(checkpoint, "load_state",
                        lambda tuner, name, state, *a, **k: (seen.extend(v.device.type for v in state.values()),
                                                             load_state(tuner, name, state, *a, **k))[1])
    loaded = PeftModel.from_pretrained(Net().to(base_device), tmp_path, torch_device=torch_device)
    reference = peft.PeftModel.from_pretrained(Net().to(base_device), tmp_path, torch_device=torch_device)
    assert seen and set(seen) == {torch_device}
    devices = [{p.device.type for p in model.parameters()} for model in (loaded, reference)]
    assert devices == [{base_device}, {base_device}]  # the adapter stays with its base layer, as peft
    with torch.no_grad():
        torch.testing.assert_close(loaded(X.to(base_device)).cpu(), expected, atol=1e-5, rtol=0)


# -- ephemeral_gpu_offload ------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the refusal is for machines without a GPU")
def test_ephemeral_gpu_offload_of_dora_without_a_gpu_is_refused_as_by_peft(tmp_path):
    _net_folder(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="ephemeral_gpu_offload"):
        PeftModel.from_pretrained(Net(), tmp_path, ephemeral_gpu_offload=True)
    with pytest.raises((RuntimeError, AssertionError)):  # peft: "Torch not compiled with CUDA enabled"
        peft.PeftModel.from_pretrained(Net(), tmp_path, ephemeral_gpu_offload=True)
    ours = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="ephemeral_gpu_offload"):
        ours.load_adapter(tmp_path, "other", ephemeral_gpu_offload=True)
    assert list(ours.peft_config) == ["default"]


def test_ephemeral_gpu_offload_warns_for_non_lora_and_is_accepted_for_lora_as_by_peft(tmp_path):
    torch.manual_seed(3)
    ia3 = get_peft_model(Net(), IA3Config(target_modules=["proj"], feedforward_modules=[], init_ia3_weights=False))
    ia3.save_pretrained(tmp_path / "ia3")
    with torch.no_grad():
        expected = ia3(X)
    for load in (PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        with pytest.warns(UserWarning, match="Ephemeral GPU offloading is not supported for this model"):
            model = load(Net(), tmp_path / "ia3", ephemeral_gpu_offload=True)
        with torch.no_grad():
            torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)
    expected = _net_folder(tmp_path / "lora")
    for load in (PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = load(Net(), tmp_path / "lora", ephemeral_gpu_offload=True)
        with torch.no_grad():
            torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)


# -- save_embedding_layers ------------------------------------------------------------------------------------


def test_save_embedding_layers_true_adds_the_base_embedding_and_output_layer():
    ours, theirs = _pair(["q_proj", "v_proj"])
    state = peftkit.get_peft_model_state_dict(ours, save_embedding_layers=True)
    reference = peft.get_peft_model_state_dict(theirs, save_embedding_layers=True)
    assert _base_keys(state) == _base_keys(reference) == ["base_model.model.lm_head.weight", f"{EMBED}.weight"]
    base = ours.get_base_model()
    assert torch.equal(state[f"{EMBED}.weight"], base.model.embed_tokens.weight)
    assert torch.equal(state["base_model.model.lm_head.weight"], base.lm_head.weight)
    assert _base_keys(peftkit.get_peft_model_state_dict(ours, save_embedding_layers=False)) == []
    assert _base_keys(peftkit.get_peft_model_state_dict(ours)) == []  # "auto": nothing targeted, vocabulary kept
    with pytest.raises(ValueError, match="save_embedding_layers"):
        peftkit.get_peft_model_state_dict(ours, save_embedding_layers="yes")


def test_save_embedding_layers_auto_when_an_embedding_is_targeted():
    ours, theirs = _pair(["embed_tokens", "q_proj"])
    with pytest.warns(UserWarning, match="embedding layers found in `target_modules`"):
        state = peftkit.get_peft_model_state_dict(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model_state_dict(theirs)
    # only the targeted layer, through its base layer: the untargeted output layer is not saved
    assert _base_keys(state) == _base_keys(reference) == [f"{EMBED}.base_layer.weight"]
    assert _base_keys(peftkit.get_peft_model_state_dict(ours, save_embedding_layers=False)) == []


def test_save_embedding_layers_auto_when_the_vocabulary_was_resized(tmp_path):
    _llama().config.save_pretrained(tmp_path)  # the base model's config.json: vocabulary 64
    ours, theirs = _pair(["q_proj"], base_model_name_or_path=str(tmp_path))
    assert _base_keys(peftkit.get_peft_model_state_dict(ours)) == []
    for model in (ours, theirs):
        model.get_base_model().resize_token_embeddings(80)
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        state = peftkit.get_peft_model_state_dict(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model_state_dict(theirs)
    assert _base_keys(state) == _base_keys(reference) == ["base_model.model.lm_head.weight", f"{EMBED}.weight"]
    assert state[f"{EMBED}.weight"].shape == (80, 16)


def test_save_pretrained_with_embedding_layers_loads_both_ways(tmp_path):
    """Tied embeddings (one tensor under two keys) and a trained vocabulary: peftkit's file has peft's keys and
    restores the vocabulary in either library, and so does peft's."""
    ours, theirs = _pair(["q_proj", "v_proj"], tie=True)
    for model in (ours, theirs):
        with torch.no_grad():
            emb = model.get_base_model().model.embed_tokens.weight
            emb.copy_(torch.arange(emb.numel(), dtype=emb.dtype).reshape(emb.shape).sin())
    expected = _logits(ours)
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(tmp_path / "ours", save_embedding_layers=True)
        theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=True)
    keys = _base_keys(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == _base_keys(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert keys == ["base_model.model.lm_head.weight", f"{EMBED}.weight"]
    for folder in ("ours", "theirs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = [PeftModel.from_pretrained(_llama(tie=True), tmp_path / folder),
                      peft.PeftModel.from_pretrained(_llama(tie=True), tmp_path / folder)]
        for model in loaded:
            torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)
