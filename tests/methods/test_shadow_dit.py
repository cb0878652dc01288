"""ShadowPEFT on diffusers transformers: Flux2's reduced-copy backbone and the token-MLP one (DiT), against peft."""

from __future__ import annotations

import peft
import pytest
import torch
from diffusers import DiTTransformer2DModel, Flux2Transformer2DModel

import peftkit
from peftkit import ShadowConfig
from peftkit.methods.shadow import ShadowAdapter

torch.set_num_threads(1)


def flux2() -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
                                   mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2))


def dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2)


def _inputs(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "flux2":
        return {"hidden_states": torch.randn(2, 4, 4, generator=g), "encoder_hidden_states": torch.randn(2, 3, 12, generator=g),
                "timestep": torch.tensor([0.5, 0.7]), "guidance": torch.tensor([1.0, 1.0]),
                "img_ids": torch.randint(0, 4, (4, 4), generator=g), "txt_ids": torch.randint(0, 4, (3, 4), generator=g)}
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 5]),
            "class_labels": torch.tensor([1, 2])}


BUILD = {"flux2": flux2, "dit": dit}
# (model, config extras, trainable count): per wrapped block 2 d r + 2 (2 d r + r + d) = 424 with d = 16, r = 4
CASES = [
    # 3 single-stream blocks; the reduced Flux2 (1 double + 2 single blocks 5152 each, modulations 1536 + 1536 +
    # 768, norm_out 512, proj_out 64; the stems are the base's, shared)
    ("flux2", {}, 3 * 424 + 2 * 5152 + 1536 + 1536 + 768 + 512 + 64),
    # 1 head (width 8), MLP width 8: the reduced copy (its own stems now: 384 + 96 + 32) 3488, projection 8 x 16
    ("flux2", {"shadow_num_attention_heads": 1, "shadow_intermediate_size": 8}, 3 * 424 + 3488 + 128),
    # 2 DiT blocks; the MLP: proj_in 16 x 16 + 16, one block LayerNorm 32 + 2 x (16 x 16 + 16)
    ("dit", {}, 2 * 424 + 272 + 32 + 2 * 272),
    # width 8: proj_in 16 x 8 + 8, LayerNorm 16, 2 x (8 x 8 + 8), projection 8 x 16
    ("dit", {"shadow_hidden_size": 8}, 2 * 424 + 136 + 16 + 2 * 72 + 128),
]


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("name", "extra", "count"), CASES)
def test_initial_state_count_and_files_both_ways_match_peft(name, extra, count, tmp_path):
    build, inputs = BUILD[name], _inputs(name)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build(), peft.ShadowConfig(r=4, init_weights=False, **extra))
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(build(), ShadowConfig(r=4, init_weights=False, **extra))
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    total = sum(p.numel() for p in build().parameters()) + count
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (count, total)
    stack = "single_transformer_blocks" if name == "flux2" else "transformer_blocks"
    assert ours.peft_config["default"].target_modules == {f"{stack}.{i}" for i in range(3 if name == "flux2" else 2)}
    with torch.no_grad():
        base = build()(**inputs).sample
    # peft's perturbed adapter read by peftkit, peftkit's perturbed adapter read by peft: the same outputs
    _perturb(theirs)
    _perturb(ours)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    pairs = [(theirs, peftkit.PeftModel.from_pretrained(build(), tmp_path / "peft")),
             (peft.PeftModel.from_pretrained(build(), tmp_path / "ours"), ours)]
    for a, b in pairs:
        with torch.no_grad():
            x, y = a.eval()(**inputs).sample, b.eval()(**inputs).sample
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
        assert (x - base).abs().max() > 1e-2  # the adapter changes the output
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(ours(**inputs).sample, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["flux2", "dit"])
def test_training_reaches_every_trainable_parameter_peft_reaches(name):
    build, inputs = BUILD[name], _inputs(name)
    grads = []
    for lib, cfg in ((peft, peft.ShadowConfig), (peftkit, ShadowConfig)):
        torch.manual_seed(0)
        model = lib.get_peft_model(build(), cfg(r=4, init_weights=False, shadow_dropout=0.0)).train()
        model(**inputs).sample.square().mean().backward()
        grads.append({n.replace(".network.", "."): p.grad for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None})
        if lib is peftkit:  # what gets no gradient is what the adapter declares unreached
            unreached = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
            assert unreached == ShadowAdapter.unreached_params(model) and unreached
    theirs, mine = (sorted(g.values(), key=lambda t: (t.numel(), t.sum().item())) for g in grads)
    assert len(theirs) == len(mine)
    for a, b in zip(theirs, mine):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_refusals_name_the_cause():
    with pytest.raises(ValueError, match="shadow_model.*only supported on Flux2"):
        peftkit.get_peft_model(dit(), ShadowConfig(shadow_model="/nonexistent"))
    with pytest.raises(ValueError, match="shadow_num_hidden_layers"):  # 4 double-stream blocks from a base of 2
        peftkit.get_peft_model(flux2(), ShadowConfig(shadow_num_hidden_layers=4))
    ours = peftkit.get_peft_model(dit(), ShadowConfig())
    with pytest.raises(NotImplementedError, match="Diffusers"):
        ours.unload_shadow()
    ours.get_base_model().enable_gradient_checkpointing()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        ours.train()(**_inputs("dit"))
    plain = ours.unload()
    assert not plain._forward_pre_hooks
