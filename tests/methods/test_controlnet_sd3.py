"""ControlNet on a diffusers transformer backbone: diffusers' SD3ControlNetModel beside the tiny SD3Transformer2DModel
of test_diffusion_transformer_methods (built from a config). Its residuals go in through the transformer's own
block_controlnet_hidden_states; outputs equal diffusers' ControlNet + the base transformer called by hand; the
diffusers folder and the PEFT files round trip; the conditioning latent is checked before anything runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import ControlNetConfig, LoraConfig, PeftModel, load_controlnet, save_controlnet
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer

from ..families import FAMILY, nudge_trainable, untouched
from ..test_diffusion_transformer_methods import sd3_tiny

G = torch.Generator().manual_seed(5)
X, CTX, POOL = torch.randn(2, 4, 8, 8, generator=G), torch.randn(2, 5, 16, generator=G), torch.randn(2, 8, generator=G)
T = torch.tensor([10.0, 500.0])
COND = torch.randn(2, 4, 8, 8, generator=G)  # a conditioning latent: (batch, in_channels, H, W) as hidden_states
CALL = {"hidden_states": X, "encoder_hidden_states": CTX, "pooled_projections": POOL, "timestep": T}
TINY_NET_PARAMS = 15_584  # SD3ControlNetModel.from_transformer(sd3_tiny(), num_layers=1, ...): measured once


def sd3_blocks(num_layers: int) -> torch.nn.Module:
    """The tiny transformer's config with another number of blocks (seed 0)."""
    from diffusers import SD3Transformer2DModel

    config = {k: v for k, v in sd3_tiny().config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    return SD3Transformer2DModel.from_config({**config, "num_layers": num_layers}).eval()


def closed_form(transformer, n: int, extra: int = 0) -> int:
    """SD3ControlNetModel's parameters from its structure: copies of the patch embedding, the time / pooled-text
    embedding, the caption projection and the first n joint blocks; one zero Linear (d x d + d) per block; the
    conditioning latent's zero patch embedding (a p x p conv, (c + extra) -> d)."""
    cfg, d = transformer.config, transformer.inner_dim
    copied = sum(p.numel() for part in (transformer.pos_embed, transformer.time_text_embed,
                                        transformer.context_embedder, *transformer.transformer_blocks[:n])
                 for p in part.parameters())
    return copied + n * (d * d + d) + (cfg.in_channels + extra) * d * cfg.patch_size ** 2 + d


def net_of(model, name: str = "default"):
    return model.get_base_model().proj_out.adapters[name].net


def by_hand(net, transformer, cond=COND, pooled_for_net=None, **call):
    """diffusers' SD3ControlNetModel, then the base transformer with its block samples, as the pipeline calls them."""
    call = {**CALL, **call}
    pooled = torch.zeros_like(call["pooled_projections"]) if pooled_for_net is None else pooled_for_net
    (blocks,) = net(hidden_states=call["hidden_states"], controlnet_cond=cond, conditioning_scale=1.0,
                    encoder_hidden_states=call["encoder_hidden_states"], pooled_projections=pooled,
                    timestep=call["timestep"], return_dict=False)
    return transformer(**call, block_controlnet_hidden_states=blocks).sample


def new_model(**kwargs):
    return peftkit.get_peft_model(sd3_tiny().eval(), ControlNetConfig(**kwargs))


@pytest.fixture(scope="module")
def trained():
    """A ControlNet adapter on the tiny SD3 transformer with every parameter moved off its initial value."""
    torch.set_num_threads(1)
    model = new_model()
    torch.manual_seed(3)
    nudge_trainable(model, 0.05)
    return model.eval()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_layers": 0}, "num_layers"), ({"num_layers": 1.5}, "num_layers"),
    ({"extra_conditioning_channels": -1}, "extra_conditioning_channels"),
    ({"force_zeros_for_pooled_projection": "yes"}, "force_zeros_for_pooled_projection"),
])
def test_bad_sd3_fields_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ControlNetConfig(**kwargs)


@pytest.mark.parametrize(("field", "value"), [("num_layers", 2), ("extra_conditioning_channels", 1),
                                              ("force_zeros_for_pooled_projection", False)])
def test_sd3_fields_are_refused_on_a_unet(field, value):
    unet = FAMILY["unet"].model()
    with untouched(unet), pytest.raises(ConfigError, match=f"ControlNetConfig.{field}: .*SD3.*expected"):
        peftkit.get_peft_model(unet, ControlNetConfig(conditioning_embedding_out_channels=[8, 16], **{field: value}))


def test_starts_at_the_base_and_copies_the_transformer():
    from diffusers import SD3ControlNetModel

    transformer = sd3_tiny().eval()
    config_before = dict(transformer.config)
    with torch.no_grad():
        base = transformer(**CALL).sample
    model = peftkit.get_peft_model(transformer, ControlNetConfig())
    net = net_of(model)
    assert isinstance(net, SD3ControlNetModel) and net.config.num_layers == 1  # the 2 blocks less the last
    assert dict(transformer.config) == config_before  # from_transformer writes num_layers into the config it reads
    for part in ("pos_embed", "time_text_embed", "context_embedder"):
        mine, theirs = getattr(net, part).state_dict(), getattr(transformer, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    mine, theirs = net.transformer_blocks[0].state_dict(), transformer.transformer_blocks[0].state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    zero = [*net.controlnet_blocks.parameters(), *net.pos_embed_input.parameters()]
    assert zero and all(p.abs().sum() == 0 for p in zero)
    with torch.no_grad():
        assert torch.equal(model(**CALL, controlnet_cond=COND).sample, base)
    reference = SD3ControlNetModel.from_transformer(sd3_tiny(), num_layers=1, num_extra_conditioning_channels=0)
    count = sum(p.numel() for p in reference.parameters())
    assert model.get_nb_trainable_parameters()[0] == count == TINY_NET_PARAMS == closed_form(sd3_tiny(), 1)
    assert model.peft_config["default"].controlnet_config["num_layers"] == 1


def test_outputs_equal_diffusers_controlnet_and_transformer_by_hand(trained):
    with torch.no_grad():
        ours = trained(**CALL, controlnet_cond=COND).sample
        plain = sd3_tiny().eval()
        torch.testing.assert_close(ours, by_hand(net_of(trained), plain), atol=1e-6, rtol=0)
        assert not torch.allclose(ours, plain(**CALL).sample, atol=1e-3)
        # positional hidden_states, as the transformer's own signature allows
        torch.testing.assert_close(trained(X, CTX, POOL, T, controlnet_cond=COND).sample, ours, atol=0, rtol=0)


def test_pooled_text_reaches_the_controlnet_only_without_force_zeros(trained):
    model = new_model(force_zeros_for_pooled_projection=False)
    net = net_of(model)
    assert net.config.force_zeros_for_pooled_projection is False
    net.load_state_dict(net_of(trained).state_dict())
    with torch.no_grad():
        ours = model(**CALL, controlnet_cond=COND).sample
        torch.testing.assert_close(ours, by_hand(net, sd3_tiny().eval(), pooled_for_net=POOL), atol=1e-6, rtol=0)
        assert not torch.allclose(ours, trained(**CALL, controlnet_cond=COND).sample, atol=1e-4)


def test_conditioning_scale_scales_the_residuals(trained):
    half = new_model(conditioning_scale=0.5)
    net = net_of(trained)
    net_of(half).load_state_dict(net.state_dict())
    with torch.no_grad():
        (blocks,) = net(hidden_states=X, controlnet_cond=COND, conditioning_scale=0.5, encoder_hidden_states=CTX,
                        pooled_projections=torch.zeros_like(POOL), timestep=T, return_dict=False)
        expected = sd3_tiny().eval()(**CALL, block_controlnet_hidden_states=blocks).sample
        torch.testing.assert_close(half(**CALL, controlnet_cond=COND).sample, expected, atol=1e-6, rtol=0)


def test_only_the_controlnet_trains():
    from peftkit.methods.controlnet import ControlNetAdapter

    model = new_model()
    torch.manual_seed(4)
    nudge_trainable(model, 0.05)
    model.train()
    model(**CALL, controlnet_cond=COND).sample.pow(2).mean().backward()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TINY_NET_PARAMS
    # the last (only) block's text stream after the attention, and the pooled projection fed zeros, as diffusers
    net = "base_model.model.proj_out.adapters.default.net."
    unreached = ControlNetAdapter.unreached_params(model)
    assert {n[len(net):] for n in unreached} == {
        "time_text_embed.text_embedder.linear_1.weight",
        *(f"transformer_blocks.0.{m}.{p}" for m in ("attn.add_q_proj", "attn.to_add_out", "ff_context.net.0.proj",
                                                    "ff_context.net.2") for p in ("weight", "bias"))}
    for name, p in model.named_parameters():
        if not name.startswith(net):
            assert not p.requires_grad and p.grad is None, name
        elif name in unreached:
            assert p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0), name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_diffusers_folder_gives_the_same_outputs_both_ways(trained, tmp_path):
    from diffusers import SD3ControlNetModel

    with torch.no_grad():
        ours = trained(**CALL, controlnet_cond=COND).sample
    save_controlnet(trained, tmp_path / "cn")
    assert {p.name for p in (tmp_path / "cn").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert json.loads((tmp_path / "cn" / "config.json").read_text())["_class_name"] == "SD3ControlNetModel"
    theirs = SD3ControlNetModel.from_pretrained(tmp_path / "cn").eval()
    with torch.no_grad():
        torch.testing.assert_close(by_hand(theirs, sd3_tiny().eval()), ours, atol=1e-6, rtol=0)
        loaded = load_controlnet(sd3_tiny().eval(), tmp_path / "cn")  # back into peftkit
        torch.testing.assert_close(loaded(**CALL, controlnet_cond=COND).sample, ours, atol=1e-6, rtol=0)
    assert loaded.peft_config["default"].controlnet_config == trained.peft_config["default"].controlnet_config
    assert loaded.peft_config["default"].num_layers == 1


def test_peft_files_round_trip(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    net_state = net_of(trained).state_dict()
    assert set(tensors) == {f"base_model.model.controlnet.{k}" for k in net_state}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CONTROLNET" and saved["controlnet_config"]["caption_projection_dim"] == 16
    loaded = PeftModel.from_pretrained(sd3_tiny().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**CALL, controlnet_cond=COND).sample,
                                   trained(**CALL, controlnet_cond=COND).sample, atol=1e-6, rtol=0)


def test_a_wrong_or_missing_latent_fails_before_anything_runs(trained):
    calls = []
    handle = trained.get_base_model().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"controlnet_cond: .*'default' expects .*\(2, 4, 8, 8\).*"
                                             r"got \(2, 3, 8, 8\)"):
            trained(**CALL, controlnet_cond=COND[:, :3])
        with pytest.raises(ValueError, match=r"controlnet_cond: .*\(2, 4, 8, 8\).*got \(2, 4, 16, 16\)"):
            trained(**CALL, controlnet_cond=torch.zeros(2, 4, 16, 16))
        with pytest.raises(ValueError, match=r"controlnet_cond: .*needs a conditioning image of shape \(2, 4, 8, 8\)"):
            trained(**CALL)
        with pytest.raises(ValueError, match="controlnet_cond: .*float tensor"):
            trained(**CALL, controlnet_cond=COND.long())
    finally:
        handle.remove()
    assert not calls


def test_blank_condition_stands_for_a_missing_latent(trained):
    blank = new_model(blank_condition=0.25)
    net_of(blank).load_state_dict(net_of(trained).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(blank(**CALL).sample,
                                   trained(**CALL, controlnet_cond=torch.full_like(COND, 0.25)).sample, atol=0, rtol=0)


def test_disabled_the_latent_is_ignored(trained):
    with torch.no_grad():
        base = sd3_tiny().eval()(**CALL).sample
        with trained.disable_adapter():
            torch.testing.assert_close(trained(**CALL, controlnet_cond=COND).sample, base, atol=0, rtol=0)
            torch.testing.assert_close(trained(**CALL).sample, base, atol=0, rtol=0)


def test_num_layers_and_extra_channels():
    from diffusers import SD3ControlNetModel

    model = peftkit.get_peft_model(sd3_blocks(3), ControlNetConfig(num_layers=2, extra_conditioning_channels=1))
    net = net_of(model)
    assert len(net.transformer_blocks) == 2 and net.pos_embed_input.proj.in_channels == 5
    reference = SD3ControlNetModel.from_transformer(sd3_blocks(3), num_layers=2, num_extra_conditioning_channels=1)
    count = sum(p.numel() for p in reference.parameters())
    assert model.get_nb_trainable_parameters()[0] == count == closed_form(sd3_blocks(3), 2, extra=1)
    torch.manual_seed(6)
    nudge_trainable(model, 0.05)
    cond = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(**CALL, controlnet_cond=cond).sample, by_hand(net, sd3_blocks(3), cond),
                                   atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match=r"controlnet_cond: .*\(2, 5, 8, 8\).*got \(2, 4, 8, 8\)"):
            model(**CALL, controlnet_cond=COND)
    assert net_of(peftkit.get_peft_model(sd3_blocks(3), ControlNetConfig())).config.num_layers == 2  # default
    transformer = sd3_blocks(3)
    with untouched(transformer), pytest.raises(ValueError, match="ControlNetConfig.num_layers: 3.*at most 2"):
        peftkit.get_peft_model(transformer, ControlNetConfig(num_layers=3))


def test_added_after_lora_it_still_copies_the_base_weights():
    transformer = sd3_tiny().eval()
    reference = {k: v.clone() for k, v in transformer.transformer_blocks[0].state_dict().items()}
    model = peftkit.get_peft_model(transformer, LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    model.add_adapter("cn", ControlNetConfig())
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, AdapterLayer)
    copied = net_of(model, "cn").transformer_blocks[0].state_dict()
    assert copied.keys() == reference.keys() and all(torch.equal(copied[k], reference[k]) for k in copied)


def test_loading_onto_another_transformer_or_a_unet_folder_is_refused(trained, tmp_path):
    from diffusers import SD3Transformer2DModel

    trained.save_pretrained(tmp_path / "peft")
    config = {k: v for k, v in sd3_tiny().config.items() if not k.startswith("_")}
    other = SD3Transformer2DModel.from_config({**config, "joint_attention_dim": 24})
    with untouched(other), pytest.raises(ValueError, match="controlnet_config: joint_attention_dim is 16, but this "
                                                           "transformer .* give 24"):
        peftkit.get_peft_model(other, ControlNetConfig.from_pretrained(tmp_path / "peft"))
    unet_model = peftkit.get_peft_model(FAMILY["unet"].model(),
                                        ControlNetConfig(conditioning_embedding_out_channels=[8, 16]))
    save_controlnet(unet_model, tmp_path / "unet_cn")
    transformer = sd3_tiny()
    with untouched(transformer), pytest.raises(ValueError, match="holds a ControlNetModel; SD3Transformer2DModel "
                                                                 "takes a SD3ControlNetModel"):
        load_controlnet(transformer, tmp_path / "unet_cn")


def test_merging_is_refused(trained):
    with pytest.raises(NotImplementedError, match="ControlNet cannot be merged"):
        trained.merge_adapter()
