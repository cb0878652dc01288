"""MonteCLoRA (``LoraConfig(monteclora_config=MontecloraConfig(...))``) against peft 0.21.2 on tiny Llama: config
fields, the file's sampler keys, eval outputs (A itself), the sampling formulas on the same noise, the training path,
the variational loss, files both ways, refused inputs."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from peft.tuners.lora.monteclora import MontecloraSampler

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora import monteclora as mc
from tests.families import FAMILY, untouched
from tests.parity import assert_loads_both_ways, assert_same_trainable_state, perturb

LLAMA = FAMILY["llama"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_monteclora_sampler."


def _cfg(lib, **mc_kw):
    mc_kw = {"num_samples": 3, "buffer_size": 2, "use_entropy": True, **mc_kw}
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, monteclora_config=lib.MontecloraConfig(**mc_kw))


def _pair(**mc_kw):
    theirs = peft.get_peft_model(LLAMA.model(), _cfg(peft, **mc_kw))
    perturb(theirs)
    ours = peftkit.get_peft_model(LLAMA.model(), _cfg(peftkit, **mc_kw))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def test_config_fields_and_defaults_match_peft():
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.MontecloraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.MontecloraConfig)}
    assert ours == theirs == {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
                              "kl_loss_weight": 1e-5, "buffer_size": 150}
    cfg = peftkit.LoraConfig(monteclora_config={"num_samples": 2})
    assert cfg.monteclora_config == peftkit.MontecloraConfig(num_samples=2)
    assert cfg.to_dict()["monteclora_config"]["num_samples"] == 2
    assert peftkit.LoraConfig(monteclora_config=peft.MontecloraConfig(use_entropy=True)).monteclora_config.use_entropy


def test_file_layout_trainable_count_and_eval_outputs():
    theirs, ours = _pair()
    assert_same_trainable_state(theirs, ours)
    state = peftkit.get_peft_model_state_dict(ours)
    assert {k[len(Q):]: tuple(v.shape) for k, v in state.items() if k.startswith(Q)} == {
        "std_prior": (4,), "expert_weights_prior": (3,), "gaussian_var_prior": (4, 4), "expert_weights": (3,)}
    # LoRA's count + r (std_prior) + num_samples per layer: q 32 -> 32, v 32 -> 16, down 37 -> 32, two layers
    assert ours.get_nb_trainable_parameters()[0] == 2 * (4 * ((32 + 32) + (32 + 16) + (37 + 32)) + 3 * (4 + 3))
    base = ours.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert mc.MontecloraAdapter.param_count(base, _cfg(peftkit), "down_proj") == 4 * (37 + 32) + 4 + 3
    theirs.eval(), ours.eval()
    out = LLAMA.run(ours)
    torch.testing.assert_close(out, LLAMA.run(theirs), atol=1e-5, rtol=0)
    torch.testing.assert_close(LLAMA.run(ours), out, atol=0, rtol=0)  # the mean: deterministic


def test_sampling_formulas_match_peft_on_the_same_noise():
    torch.manual_seed(0)
    sampler = MontecloraSampler(in_features=6, out_features=4, num_samples=5, sample_scaler=0.3, buffer_size=1,
                                device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sampler.std_prior.normal_(), sampler.expert_weights_prior.normal_()
    z_mvn, z_w, z_dir = torch.randn(5, 6, 4), sampler.sampler.wish_sampler._bartlett_sampling(), torch.randn(5)
    var = sampler.wishart_reparameterization(torch.diag(torch.exp(sampler.std_prior)), z_w)
    ours_var = mc.gaussian_var(sampler.std_prior, z_w)
    torch.testing.assert_close(ours_var, var, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mc.perturbations(z_mvn, ours_var, 0.3),
                               sampler.multivariate_reparameterization(z_mvn, var), atol=1e-6, rtol=1e-5)
    logits = sampler.dirichlet_reparameterization(torch.exp(sampler.expert_weights_prior), z_dir)
    torch.testing.assert_close(mc.mixture_weights(sampler.expert_weights_prior, z_dir), torch.softmax(logits, -1),
                               atol=1e-6, rtol=1e-5)
    A = torch.randn(4, 6)
    expected = torch.einsum("n,nij->ij", torch.softmax(logits, -1), A.T + z_mvn).T
    torch.testing.assert_close(mc.mixed_factor(A, z_mvn, torch.softmax(logits, -1)), expected, atol=1e-6, rtol=1e-6)


def test_training_path_and_variational_loss():
    # no noise (sample_scaler=0): the mixture is A itself, so training outputs and gradients are peft's
    theirs, ours = _pair(sample_scaler=0.0)
    theirs.train(), ours.train()
    expected = theirs.base_model._get_monteclora_loss()  # from the buffers loaded with the file: deterministic
    torch.testing.assert_close(mc.monteclora_loss(ours), expected, atol=1e-6, rtol=1e-6)
    assert abs(expected.item() - 1 / 3) < 1e-2  # the entropy of uniform weights dominates
    out_t, out_o = LLAMA.run(theirs), LLAMA.run(ours)
    torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=0)
    out_t.square().mean().backward()
    (out_o.square().mean() + mc.monteclora_loss(ours)).backward()  # the loss after a draw: no A / B gradient
    ref = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if "lora_A" in k or "lora_B" in k}
    for name, p in ours.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            key = name.replace(".adapters.default", "").replace(".lora_A", ".lora_A.weight").replace(
                ".lora_B", ".lora_B.weight")
            torch.testing.assert_close(p.grad, ref[key], atol=1e-5, rtol=1e-4, msg=name)
    # the loss after a draw carries gradients to both priors (through the draw), and is 0 at eval (as peft)
    adapter = ours.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.std_prior.grad.abs().sum() > 1e-6 and adapter.expert_weights_prior.grad.abs().sum() > 1e-6
    ours.eval()
    assert mc.monteclora_loss(ours) == 0.0 and mc.monteclora_loss(ours, "other") == 0.0
    # with noise: training outputs vary around the eval output, by about sample_scaler
    theirs, ours = _pair(sample_scaler=0.05)
    ours.eval()
    mean = LLAMA.run(ours)
    ours.train()
    with torch.no_grad():
        a = LLAMA.run(ours)
        torch.manual_seed(1)
        inputs = LLAMA.inputs()
        seeded = LLAMA.output(ours(**inputs))  # the same seed draws the same noise
        b = LLAMA.output(ours(**inputs))  # the next draw
    assert 1e-4 < (a - mean).abs().max() < 1 and torch.equal(a, seeded) and (a - b).abs().max() > 1e-4


def test_files_load_both_ways(tmp_path):
    def train(model, family):
        perturb(model)
        model.train()
        family.run(model)  # a draw: the saved gaussian_var_prior / expert_weights are no longer the initial ones
        model.eval()

    assert_loads_both_ways(LLAMA, _cfg(peft), _cfg(peftkit), tmp_path, train=train)
    for side in ("peft", "peftkit"):
        ours = peftkit.PeftModel.from_pretrained(LLAMA.model(), tmp_path / side, is_trainable=True)
        theirs = peft.PeftModel.from_pretrained(LLAMA.model(), tmp_path / side, is_trainable=True)
        state = peftkit.get_peft_model_state_dict(ours)
        assert not torch.equal(state[Q + "gaussian_var_prior"], torch.eye(4))
        for k, v in peft.get_peft_model_state_dict(theirs).items():
            assert torch.equal(state[k], v), k
        ours.train(), theirs.train()
        torch.testing.assert_close(mc.monteclora_loss(ours), theirs.base_model._get_monteclora_loss(), atol=1e-6,
                                   rtol=1e-6)
    assert peft.PeftConfig.from_pretrained(tmp_path / "peftkit").monteclora_config.num_samples == 3


@pytest.mark.parametrize("kwargs,field", [
    ({"monteclora_config": {"num_samples": 0}}, "num_samples"),
    ({"monteclora_config": {"dirichlet_prior": 0}}, "dirichlet_prior"),
    ({"monteclora_config": {"use_entropy": "yes"}}, "use_entropy"),
    ({"monteclora_config": {"sample_scaler": -1}}, "sample_scaler"),
    ({"monteclora_config": {"buffer_size": 0}}, "buffer_size"),
    ({"monteclora_config": "x"}, "monteclora_config"),
    ({"monteclora_config": {}, "use_dora": True}, "monteclora_config"),
    ({"monteclora_config": {}, "velora_config": {}}, "monteclora_config"),
    ({"monteclora_config": {}, "target_parameters": ["experts.down_proj"]}, "monteclora_config"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        peftkit.LoraConfig(**kwargs)


def test_unsupported_layer_leaves_model_untouched():
    model = LLAMA.model()
    with untouched(model), pytest.raises(ValueError, match="embed_tokens"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                         monteclora_config=peftkit.MontecloraConfig()))
