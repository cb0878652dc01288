"""ShadowPEFT on two-stream diffusers transformers (SD3's MMDiT, Flux.1): the state rides the image stream, checked
against the method's formula run through hooks on the plain model; against peft where peft runs (one wrapped block,
text as long as the image tokens: with more blocks peft hands its carrier on as the next block's text input and
fails); refusals; a Flux2 shadow saved and read back as a pretrained ``shadow_model`` (``Flux2Shadow.from_folder``)."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel, FluxTransformer2DModel, SD3Transformer2DModel

import peftkit
from peftkit import ShadowConfig
from peftkit.methods.shadow import ShadowAdapter, ShadowLayer
from peftkit.methods.shadow.flux2 import EMBEDDERS, Flux2Shadow
from peftkit.methods.shadow.wrapper import block_hidden
from peftkit.targeting import NotApplicableError

from .test_shadow_dit import _inputs as flux2_inputs
from .test_shadow_dit import _perturb, dit, flux2

torch.set_num_threads(1)
IMAGE_TOKENS = 16  # both tiny models: 16 image tokens of width 16


def sd3() -> SD3Transformer2DModel:
    """2 joint blocks (the last ``context_pre_only``: it returns ``(None, hidden_states)``) of width 16, 8 x 8 latents
    in 2 x 2 patches."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)


def flux1() -> FluxTransformer2DModel:
    """2 double-stream and 2 single-stream blocks of width 16 over 16 image tokens."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=8,
                                  guidance_embeds=False, axes_dims_rope=(2, 2, 4))


def _inputs(name: str, text: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "sd3":
        return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(2, text, 16, generator=g),
                "pooled_projections": torch.randn(2, 8, generator=g), "timestep": torch.tensor([3, 5])}
    return {"hidden_states": torch.randn(2, IMAGE_TOKENS, 4, generator=g),
            "encoder_hidden_states": torch.randn(2, text, 12, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g), "timestep": torch.tensor([0.5, 0.7]),
            "img_ids": torch.randint(0, 4, (IMAGE_TOKENS, 3), generator=g),
            "txt_ids": torch.randint(0, 4, (text, 3), generator=g)}


BUILD = {"sd3": sd3, "flux1": flux1}
SD3_BLOCKS = ["transformer_blocks.0", "transformer_blocks.1"]
FLUX1_SINGLE = ["single_transformer_blocks.0", "single_transformer_blocks.1"]


def _reference(name: str, ours: peftkit.PeftModel, paths: list[str], inputs: dict) -> torch.Tensor:
    """The method's equations on the plain model through hooks: the first wrapped block's image input seeds
    ``s = P(backbone(h))``; each wrapped block runs on ``h + alpha (h - s) W_down^T W_up^T`` and then
    ``s = (1 - g) s + g T(o)``, ``g = sigmoid(G(o))``, with ``o`` the image stream of its output: diffusers' blocks
    return ``(encoder_hidden_states, hidden_states)``, so ``o = out[1]``."""
    adapters = {p: ours.get_base_model().get_submodule(p).adapters["default"] for p in paths}
    network = adapters[paths[0]].network
    state: dict[str, torch.Tensor] = {}
    model = BUILD[name]().eval()

    def pre(path):
        def hook(module, args, kwargs):
            assert not args  # SD3 and Flux.1 call their blocks by keyword
            h, a = kwargs["hidden_states"], adapters[path]
            if "s" not in state:
                state["s"] = network.projection(network.backbone(h))
            delta = F.linear(F.linear(h - state["s"], a.shadow_down.weight), a.shadow_up.weight)
            return args, {**kwargs, "hidden_states": h + a.alpha * delta}
        return hook

    def post(path):
        def hook(module, args, kwargs, out):
            o, a = out[1], adapters[path]
            g = torch.sigmoid(a.shadow_update_gate(o))
            state["s"] = (1 - g) * state["s"] + g * a.shadow_update_transform(o)
        return hook

    for path in paths:
        block = model.get_submodule(path)
        block.register_forward_pre_hook(pre(path), with_kwargs=True)
        block.register_forward_hook(post(path), with_kwargs=True)
    return model(**inputs).sample


@pytest.mark.parametrize(("name", "targets", "text"), [
    ("sd3", None, 5), ("sd3", None, IMAGE_TOKENS),
    ("flux1", None, 5), ("flux1", None, IMAGE_TOKENS),
    # the state starts in the double-stream stack and carries on into the single-stream one
    ("flux1", ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"], 5),
])
def test_state_rides_the_image_stream_as_the_equations(name, targets, text):
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(BUILD[name](), ShadowConfig(r=4, init_weights=False, target_modules=targets))
    paths = targets or (SD3_BLOCKS if name == "sd3" else FLUX1_SINGLE)
    assert sorted(ours.peft_config["default"].target_modules) == sorted(paths)
    _perturb(ours)
    inputs = _inputs(name, text)
    with torch.no_grad():
        got = ours.eval()(**inputs).sample
        expected = _reference(name, ours, paths, inputs)
        base = BUILD[name]()(**inputs).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - base).abs().max() > 1e-2
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(ours(**inputs).sample, base, atol=0, rtol=0)


def test_every_update_but_the_last_reaches_the_output():
    """Training: every trainable tensor but the last block's update networks gets a gradient (the SD3 state runs
    through the first block's update into the second block's input)."""
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(sd3(), ShadowConfig(r=4, init_weights=False, shadow_dropout=0.0)).train()
    ours(**_inputs("sd3", 5)).sample.square().mean().backward()
    unreached = {n for n, p in ours.named_parameters() if p.requires_grad and p.grad is None}
    assert unreached == ShadowAdapter.unreached_params(ours) and len(unreached) == 8  # T, G: 2 Linear x (w, b) each
    assert all(".transformer_blocks.1." in n for n in unreached)


@pytest.mark.parametrize(("name", "target"), [("sd3", "transformer_blocks.0"), ("flux1", "transformer_blocks.0"),
                                              ("flux1", "single_transformer_blocks.0")])
def test_one_block_matches_peft_with_files_both_ways(name, target, tmp_path):
    """peft runs these models only with one wrapped block (not SD3's last) and text as long as the image tokens."""
    build, inputs = BUILD[name], _inputs(name, IMAGE_TOKENS)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build(), peft.ShadowConfig(r=4, init_weights=False, target_modules=[target]))
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(build(), ShadowConfig(r=4, init_weights=False, target_modules=[target]))
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    # one block 2 d r + 2 (2 d r + r + d) = 424 (d = 16, r = 4); the token MLP: proj_in 272, LayerNorm 32, 2 x 272
    total = sum(p.numel() for p in build().parameters()) + 424 + 272 + 32 + 2 * 272
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (424 + 848, total)
    _perturb(theirs)
    _perturb(ours)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        base = build()(**inputs).sample
    for a, b in ((theirs, peftkit.PeftModel.from_pretrained(build(), tmp_path / "peft")),
                 (peft.PeftModel.from_pretrained(build(), tmp_path / "ours"), ours)):
        with torch.no_grad():
            x, y = a.eval()(**inputs).sample, b.eval()(**inputs).sample
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
        assert (x - base).abs().max() > 1e-2


def _untouched(model: torch.nn.Module, build, config: ShadowConfig, match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotApplicableError, match=match):
        peftkit.get_peft_model(model, config)
    assert not any(isinstance(m, ShadowLayer) for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_unknown_two_stream_blocks_and_flux2_double_blocks_are_refused_untouched():
    torch.manual_seed(0)
    cog = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=1, sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
                                      text_embed_dim=16, time_embed_dim=8, max_text_seq_length=4)
    # CogVideoXBlock returns (hidden_states, encoder_hidden_states): another order than SD3's and Flux's
    _untouched(cog, None, ShadowConfig(), r"CogVideoXTransformer3DModel.*CogVideoXBlock.*image stream")
    _untouched(flux2(), None, ShadowConfig(target_modules=["transformer_blocks.0", "single_transformer_blocks.0"]),
               r"Flux2Transformer2DModel.*\['transformer_blocks.0'\].*single-stream")


def test_block_output_reading():
    a, b = torch.zeros(1), torch.ones(1)
    assert block_hidden((a, b)) is a and block_hidden((a, b), 1) is b and block_hidden(b, None) is b
    with pytest.raises(TypeError, match="image stream is not known"):
        block_hidden((a, b), None)


# -- Flux2: a shadow saved and read back as a pretrained shadow_model ----------------------------------------------
# the reduced Flux2 (1 double + 2 single blocks 5152 each, modulations 1536 + 1536 + 768, norm_out 512, proj_out 64),
# its stems frozen when pretrained, as shared when mirrored; 3 wrapped blocks of 424
FLUX2_COUNT = 3 * 424 + 2 * 5152 + 1536 + 1536 + 768 + 512 + 64


def _saved_mirror(tmp_path) -> tuple[peftkit.PeftModel, Flux2Shadow, str]:
    torch.manual_seed(0)
    mirror = peftkit.get_peft_model(flux2(), ShadowConfig(r=4, init_weights=False))
    _perturb(mirror)
    backbone = next(m.network.backbone for m in mirror.modules() if getattr(m, "network", None) is not None)
    folder = str(tmp_path / "flux2-shadow")
    backbone.save_pretrained(folder)
    return mirror, backbone, folder


def test_flux2_shadow_saved_reads_back_through_from_folder(tmp_path):
    mirror, backbone, folder = _saved_mirror(tmp_path)
    loaded = Flux2Shadow.from_folder(flux2(), folder)
    mine, base = loaded.model.state_dict(), flux2().state_dict()
    # the stems the mirror shares with the base are written as the shadow's own, equal to the base's
    stems = {k for k in base if k.startswith(tuple(f"{n}." for n in EMBEDDERS))}
    assert stems and set(mine) == set(backbone.model.state_dict()) | stems
    assert all(torch.equal(mine[k], base[k]) for k in stems)
    assert all(torch.equal(mine[k], v) for k, v in backbone.model.state_dict().items())
    g = torch.Generator().manual_seed(2)
    h, mod = torch.randn(2, 7, 16, generator=g), torch.randn(2, 48, generator=g)
    kwargs = {"encoder_hidden_states": None, "temb_mod": mod}
    with torch.no_grad():
        seed = loaded(h, (), kwargs)
        torch.testing.assert_close(seed, backbone(h, (), kwargs), atol=0, rtol=0)
        assert (seed - h).abs().max() > 1e-2


def test_flux2_pretrained_shadow_matches_peft_with_files_both_ways(tmp_path):
    _, _, folder = _saved_mirror(tmp_path)
    inputs = flux2_inputs("flux2")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(flux2(), peft.ShadowConfig(r=4, init_weights=False, shadow_model=folder))
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(flux2(), ShadowConfig(r=4, init_weights=False, shadow_model=folder))
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert "base_model.shadow_backbone.default.model.x_embedder.weight" in mine  # pretrained stems: saved, frozen
    total = sum(p.numel() for p in flux2().parameters()) + sum(
        t.numel() for k, t in mine.items() if k.startswith("base_model.shadow_backbone.")) + 3 * 424
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (FLUX2_COUNT, total)
    _perturb(theirs)
    _perturb(ours)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        base = flux2()(**inputs).sample
    for a, b in ((theirs, peftkit.PeftModel.from_pretrained(flux2(), tmp_path / "peft")),
                 (peft.PeftModel.from_pretrained(flux2(), tmp_path / "ours"), ours)):
        with torch.no_grad():
            x, y = a.eval()(**inputs).sample, b.eval()(**inputs).sample
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
        assert (x - base).abs().max() > 1e-2
    ours.train()
    ours(**inputs).sample.square().mean().backward()
    unreached = {n for n, p in ours.named_parameters() if p.requires_grad and p.grad is None}
    assert unreached == ShadowAdapter.unreached_params(ours) and unreached


def test_flux2_bad_shadow_folders_are_refused_untouched(tmp_path):
    _, backbone, _ = _saved_mirror(tmp_path)
    backbone.model.save_pretrained(tmp_path / "no-stems")  # diffusers' own save: the shared stems are not written
    dit().save_pretrained(tmp_path / "dit")
    for folder, match in ((tmp_path / "no-stems", r"lacks tensors \['context_embedder.weight'"),
                          (tmp_path / "dit", "holds a DiTTransformer2DModel, expected a saved Flux2Transformer2DModel"),
                          (tmp_path / "missing", "is not a folder of a saved Flux2Transformer2DModel")):
        model = flux2()
        with pytest.raises(ValueError, match=f"ShadowConfig.shadow_model: .*{match}"):
            peftkit.get_peft_model(model, ShadowConfig(shadow_model=str(folder)))
        assert not any(isinstance(m, ShadowLayer) for m in model.modules()) and not model._forward_pre_hooks
