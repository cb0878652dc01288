"""VeLoRA (``LoraConfig(velora_config=VeloraConfig(...))``) against peft 0.21.2 on tiny Llama: config fields, the
file's ``lora_velora_embed``, training outputs and gradients (the compressed backward), the embed's updates, files
both ways, refused inputs."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora import velora
from tests.families import FAMILY, untouched
from tests.parity import assert_loads_both_ways, assert_same_trainable_state, perturb

LLAMA = FAMILY["llama"]
TARGETS = ["q_proj", "v_proj", "down_proj"]  # down_proj: d_in 37, not a multiple of num_groups (padded)
EMBED = "base_model.model.model.layers.0.mlp.down_proj.lora_velora_embed"


def _cfg(lib, init_type="batch_average", **kw):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                          velora_config=lib.VeloraConfig(num_groups=4, scale=0.7, init_type=init_type), **kw)


def _pair(init_type="batch_average"):
    theirs = peft.get_peft_model(LLAMA.model(), _cfg(peft, init_type))
    perturb(theirs)
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit, init_type))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def _grads(model, key_of):
    return {key_of(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _ours_key(name):
    return name.replace(".adapters.default", "").replace(".lora_A", ".lora_A.weight").replace(
        ".lora_B", ".lora_B.weight")


def test_config_fields_and_defaults_match_peft():
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.VeloraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.VeloraConfig)}
    assert ours == theirs == {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}
    cfg = peftkit.LoraConfig(velora_config={"num_groups": 8})  # read back from adapter_config.json
    assert cfg.velora_config == peftkit.VeloraConfig(num_groups=8)
    assert cfg.to_dict()["velora_config"] == {"num_groups": 8, "scale": 1.0, "init_type": "batch_average"}
    assert peftkit.LoraConfig(velora_config=peft.VeloraConfig(scale=2.0)).velora_config.scale == 2.0


def test_file_layout_and_trainable_count():
    theirs, ours = _pair()
    assert_same_trainable_state(theirs, ours)
    state = peftkit.get_peft_model_state_dict(ours)
    assert state[EMBED].shape == (10,) and state[EMBED.replace("mlp.down_proj", "self_attn.q_proj")].shape == (8,)
    assert ours.get_nb_trainable_parameters()[0] == 2 * 4 * ((32 + 32) + (32 + 16) + (37 + 32))  # LoRA's count


@pytest.mark.parametrize("init_type", ["batch_average", "random"])
def test_training_outputs_grads_and_embed_match_peft(init_type):
    theirs, ours = _pair(init_type)
    theirs.train(), ours.train()
    for step in range(2):  # the embed follows each batch (batch_average) or stays (random)
        for model in (theirs, ours):
            for p in model.parameters():
                p.grad = None
        out_t, out_o = LLAMA.run(theirs), LLAMA.run(ours)
        torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=0)
        (out_t.square().mean() * (step + 1)).backward()
        (out_o.square().mean() * (step + 1)).backward()
        ref = _grads(theirs, lambda n: n.replace(".default", ""))
        got = _grads(ours, _ours_key)
        assert got.keys() == ref.keys() and len(got) == 12
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
        their_state, our_state = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
        torch.testing.assert_close(our_state[EMBED], their_state[EMBED], atol=1e-6, rtol=0)
        assert abs(our_state[EMBED].norm().item() - 1) < 1e-5
    # the compressed backward differs from exact LoRA's gradient of lora_A (not a plain LoRA in disguise)
    plain = peftkit.get_peft_model(LLAMA.model(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peftkit.set_peft_model_state_dict(plain, {k: v for k, v in peft.get_peft_model_state_dict(theirs).items()
                                              if "velora" not in k})
    plain.train()
    LLAMA.run(plain).square().mean().mul(2).backward()
    exact = _grads(plain, _ours_key)
    key = next(k for k in exact if "down_proj.lora_A" in k)
    assert (exact[key] - got[key]).abs().max() > 1e-4
    torch.testing.assert_close(exact[key.replace("lora_A", "lora_B")], got[key.replace("lora_A", "lora_B")],
                               atol=1e-5, rtol=1e-4)


def test_batch_average_once_and_eval_is_plain_lora():
    theirs, ours = _pair("batch_average_once")
    with torch.no_grad():  # eval / no autograd: LoRA's outputs, the embed untouched
        torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    assert peftkit.get_peft_model_state_dict(ours)[EMBED].abs().sum() == 0
    ours.train(), theirs.train()
    LLAMA.run(ours), LLAMA.run(theirs)
    first = peftkit.get_peft_model_state_dict(ours)[EMBED].clone()
    torch.testing.assert_close(first, peft.get_peft_model_state_dict(theirs)[EMBED], atol=1e-6, rtol=0)
    ours(**{k: v + 1 for k, v in LLAMA.inputs().items()})  # another batch: the embed stays
    assert torch.equal(peftkit.get_peft_model_state_dict(ours)[EMBED], first)


def test_grad_factor_is_the_reconstruction_product():
    torch.manual_seed(0)
    x, g, v = torch.randn(5, 37), torch.randn(5, 3), velora.normalize(torch.randn(10))
    c = velora.compress(x, v, 4)
    recon = (c.unsqueeze(-1) * v).reshape(5, -1)[:, :37] * 0.7  # peft's reconstruction
    torch.testing.assert_close(velora.grad_factor(g, c, v, 37, 0.7), g.t() @ recon, atol=1e-6, rtol=0)
    assert torch.equal(velora.normalize(torch.zeros(4)), torch.full((4,), 0.5))


def test_files_load_both_ways(tmp_path):
    def train(model, family):
        perturb(model)
        model.train()
        family.run(model)  # one training forward: the embed averaged from the batch, saved in the file
        model.eval()

    assert_loads_both_ways(LLAMA, _cfg(peft), _cfg(peftkit), tmp_path, train=train)
    for side in ("peft", "peftkit"):
        model = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path / side)
        theirs = peft.PeftModel.from_pretrained(LLAMA.model(), tmp_path / side)
        ref = peft.get_peft_model_state_dict(theirs)
        assert ref[EMBED].abs().sum() > 0
        torch.testing.assert_close(peftkit.get_peft_model_state_dict(model)[EMBED], ref[EMBED], atol=0, rtol=0)
    assert peft.PeftConfig.from_pretrained(tmp_path / "peftkit").velora_config == peft.VeloraConfig(
        num_groups=4, scale=0.7)


@pytest.mark.parametrize("kwargs,field", [
    ({"velora_config": {"num_groups": 0}}, "num_groups"),
    ({"velora_config": {"num_groups": 2.5}}, "num_groups"),
    ({"velora_config": {"scale": 0}}, "scale"),
    ({"velora_config": {"init_type": "mean"}}, "init_type"),
    ({"velora_config": 3}, "velora_config"),
    ({"velora_config": {}, "use_dora": True}, "velora_config"),
    ({"velora_config": {}, "kasa_config": {}}, "velora_config|kasa_config"),
    ({"velora_config": {}, "target_parameters": ["experts.down_proj"]}, "velora_config"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        peftkit.LoraConfig(**kwargs)


def test_unsupported_layer_leaves_model_untouched():
    model = LLAMA.model()
    with untouched(model), pytest.raises(ValueError, match="embed_tokens"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                         velora_config=peftkit.VeloraConfig()))
