"""IP-Adapter on SD3's transformer (a tiny SD3Transformer2DModel built from a config): diffusers' SD3 processor and
timestep-conditioned resampler, the base output bit for bit without an image prompt, diffusers' own SD3 IP-Adapter
path to 1e-6 with one, gradients on the adapter alone, peftkit's file and diffusers' SD3 file both ways
(StableDiffusion3Pipeline.load_ip_adapter gives the same outputs), and a wrong image prompt refused before the call
runs."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import IPAdapterConfig, LoraConfig, PeftModel, save_ip_adapter, set_ip_adapter_scale, tiny_models
from peftkit.config import ConfigError
from peftkit.methods.ip_adapter import IPAdapterAdapter, IPAdapterLayer, ip_adapter_state_dict, load_ip_adapter_file
from peftkit.targeting import TargetError

from ..families import nudge_trainable
from ..test_diffusion_transformer_methods import CTX, POOL, T, X, sd3_tiny

D, L, N, W = 24, 6, 4, 16  # image feature width and count, image tokens, resampler width
ATTN = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]  # the tiny SD3's joint attentions (width 16)
SIZES = dict(image_embed_dim=D, num_tokens=N, resampler_dim=W, resampler_heads=1, timestep_in_dim=8)
PROC_KEYS = ["norm_ip.linear.bias", "norm_ip.linear.weight", "norm_ip_k.weight", "norm_k.weight", "norm_q.weight",
             "to_k_ip.weight", "to_v_ip.weight"]


def _base():
    torch.set_num_threads(1)
    return sd3_tiny().eval()


def _embeds(batch: int = 2, seed: int = 7):
    return torch.randn(batch, L, D, generator=torch.Generator().manual_seed(seed))


def _ip(nudge: float = 0.2, name: str = "default", **kwargs):
    model = peftkit.get_peft_model(_base(), IPAdapterConfig(**{**SIZES, "scale": 0.7, **kwargs}), adapter_name=name)
    torch.manual_seed(3)
    nudge_trainable(model, nudge)
    return model.eval()


@torch.no_grad()
def _run(model, **kwargs):
    return model(hidden_states=X, encoder_hidden_states=CTX, pooled_projections=POOL, timestep=T, **kwargs).sample


def _prompt(e):
    return {"joint_attention_kwargs": {"ip_adapter_image_embeds": e}}


@pytest.fixture(scope="module")
def base_out():
    return _run(_base())


@pytest.mark.parametrize("field", ["resampler_dim", "resampler_depth", "resampler_heads", "timestep_in_dim"])
def test_bad_resampler_sizes_raise_config_error(field):
    with pytest.raises(ConfigError, match=f"IPAdapterConfig.{field}"):
        IPAdapterConfig(**{field: 1 if field == "timestep_in_dim" else 0})
    with pytest.raises(ConfigError, match=f"IPAdapterConfig.{field}"):
        IPAdapterConfig(**{field: 2.0})


def test_diffusers_sd3_processor_and_resampler_with_the_exact_trainable_count():
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    plain = dict(_base().named_modules())
    model = peftkit.get_peft_model(_base(), IPAdapterConfig(**SIZES))
    layers = [(p, m) for p, m in model.get_base_model().named_modules() if isinstance(m, IPAdapterLayer)]
    assert [p for p, _ in layers] == ATTN
    adapters = [layer.adapters["default"] for _, layer in layers]
    for (path, _), a in zip(layers, adapters):
        assert type(a.processor) is SD3IPAdapterJointAttnProcessor2_0 and a.processor.scale == 1.0
        assert torch.equal(a.processor.to_k_ip.weight, plain[path].to_k.weight)  # the paper's initialisation
        assert torch.equal(a.processor.to_v_ip.weight, plain[path].to_v.weight)
    assert type(adapters[0].image_proj) is IPAdapterTimeImageProjection
    assert adapters[0].image_proj is adapters[1].image_proj  # one resampler per adapter
    proj = IPAdapterTimeImageProjection(embed_dim=D, output_dim=16, hidden_dim=W, depth=4, dim_head=64, heads=1,
                                        num_queries=N, timestep_in_dim=8)
    proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=16, ip_hidden_states_dim=16, head_dim=8, timesteps_emb_dim=W)
    numel = sum(p.numel() for p in proj.parameters()) + 2 * sum(p.numel() for p in proc.parameters())
    # processor: 2 W d + 2 d + 2 d^2 + 3 h = 512 + 32 + 512 + 24; resampler: latents 64, proj_in 400, proj_out 272,
    # norm_out 32, time embedding 144 + 272, 4 blocks of 4 W 64 + 12 W^2 + 10 W = 7,328
    assert model.get_nb_trainable_parameters()[0] == numel == 2 * 1_080 + 30_496
    targets = [(p, plain[p]) for p in ATTN]
    closed = sum(IPAdapterAdapter.param_count(m, model.peft_config["default"]) for _, m in targets)
    assert closed + IPAdapterAdapter.shared_param_count(targets, model.peft_config["default"]) == numel
    trainable = {n.split("adapters.default.")[-1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"processor", "image_proj"}


def test_no_image_prompt_scale_zero_or_disabled_give_the_base_bit_for_bit(base_out):
    model = _ip()
    assert torch.equal(_run(model), base_out)
    kwargs = _prompt(_embeds())
    assert (_run(model, **kwargs) - base_out).abs().max() > 1e-2
    assert set(kwargs["joint_attention_kwargs"]) == {"ip_adapter_image_embeds"}  # the caller's dict is left alone
    with model.disable_adapter():
        assert torch.equal(_run(model, **_prompt(_embeds())), base_out)
    set_ip_adapter_scale(model, 0)
    assert torch.equal(_run(model, **_prompt(_embeds())), base_out)


def _diffusers_by_hand(model, scale):
    """The base transformer with diffusers' SD3 IP-Adapter set up by hand: the adapter's processors and resampler."""
    ref = _base()
    layers = dict((p, m) for p, m in model.get_base_model().named_modules() if isinstance(m, IPAdapterLayer))
    procs = {}
    for path in ATTN:
        proc = copy.deepcopy(layers[path].adapters["default"].processor)
        proc.scale = scale
        procs[f"{path}.processor"] = proc
    ref.set_attn_processor(procs)
    ref.image_proj = copy.deepcopy(layers[ATTN[0]].adapters["default"].image_proj)
    return ref


def test_image_prompt_equals_diffusers_sd3_ip_adapter():
    model = _ip()
    e = _embeds()
    ours = _run(model, **_prompt(e))
    theirs = _run(_diffusers_by_hand(model, 0.7), **_prompt(e))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert torch.equal(_run(model, ip_adapter_image_embeds=e), ours)  # peftkit's own argument: the same prompt
    set_ip_adapter_scale(model, 1.5)
    torch.testing.assert_close(_run(model, **_prompt(e)), _run(_diffusers_by_hand(model, 1.5), **_prompt(e)),
                               atol=1e-6, rtol=0)


def test_only_the_adapter_gets_gradients():
    model = _ip().train()
    out = model(hidden_states=X, encoder_hidden_states=CTX, pooled_projections=POOL, timestep=T,
                joint_attention_kwargs={"ip_adapter_image_embeds": _embeds()}).sample
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize(("embeds", "match"), [
    (torch.randn(2, L, 5), r"ip_adapter_image_embeds: .*expects a float tensor \(batch, 24\) or \(batch, tokens, 24\) "
                           r"with batch = 2.*got shape \(2, 6, 5\)"),
    (torch.randn(3, L, D), r"ip_adapter_image_embeds: .*\(one image prompt per batch row\), got shape \(3, 6, 24\)"),
    (torch.ones(2, L, D, dtype=torch.long), r"ip_adapter_image_embeds: .*got a torch.int64 tensor"),
])
def test_a_wrong_image_prompt_is_refused_before_the_call_runs(embeds, match):
    model = _ip()
    calls = []
    model.get_base_model().pos_embed.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        _run(model, **_prompt(embeds))
    assert calls == []


def test_two_prompted_adapters_and_a_missing_timestep_are_refused():
    model = _ip(name="a")
    model.add_adapter("b", IPAdapterConfig(**SIZES))
    model.base_model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match=r"one image branch.*\['a', 'b'\]"):
        _run(model, **_prompt(_embeds()))
    model.base_model.set_adapter("a")
    with pytest.raises(ValueError, match="timestep: IP-Adapter on SD3"):
        model(hidden_states=X, encoder_hidden_states=CTX, pooled_projections=POOL, **_prompt(_embeds()))


def test_a_base_with_diffusers_own_ip_adapter_or_other_targets_are_refused():
    ref = _diffusers_by_hand(_ip(), 0.5)
    with pytest.raises(ValueError, match="SD3IPAdapterJointAttnProcessor2_0.*diffusers' own IP-Adapter"):
        peftkit.get_peft_model(ref, IPAdapterConfig(**SIZES))
    with pytest.raises(TargetError, match=r"expected joint attention modules \(SD3\)"):
        peftkit.get_peft_model(_base(), IPAdapterConfig(**SIZES, target_modules=["to_q"]))


def test_peftkit_file_round_trip(tmp_path):
    model = _ip()
    e = _embeds()
    expected = _run(model, **_prompt(e))
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {k for k in keys if not k.startswith("base_model.image_proj.")} == {
        f"base_model.model.{p}.{k}" for p in ATTN for k in PROC_KEYS}
    assert len(keys) == 2 * len(PROC_KEYS) + len(dict(_proj_params(model)))
    loaded = PeftModel.from_pretrained(_base(), tmp_path)
    assert loaded.peft_config["default"].resampler_dim == W and loaded.peft_config["default"].scale == 0.7
    torch.testing.assert_close(_run(loaded, **_prompt(e)), expected, atol=1e-6, rtol=0)


def _proj_params(model):
    layer = model.get_base_model().get_submodule(ATTN[0])
    return layer.adapters["default"].image_proj.named_parameters()


def _pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)


def test_diffusers_sd3_file_loads_into_the_pipeline_with_equal_outputs(tmp_path):
    model = _ip()
    path = save_ip_adapter(model, str(tmp_path))
    keys = set(load_file(path))
    assert {k for k in keys if k.startswith("ip_adapter.")} == {f"ip_adapter.{i}.{k}" for i in range(2) for k in PROC_KEYS}
    assert "image_proj.layers.3.0.to_kv.weight" in keys and "image_proj.layers.3.2.1.bias" in keys  # original names
    pipe = _pipeline(_base())
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)  # diffusers' loader starts at 0.5
    e = _embeds()
    ours = _run(model, **_prompt(e))
    torch.testing.assert_close(_run(pipe.transformer, **_prompt(e)), ours, atol=1e-6, rtol=0)
    direct = _base()  # the transformer's own loader, on diffusers' nested state dict
    direct._load_ip_adapter_weights({part: {k.split(".", 1)[1]: v for k, v in load_file(path).items()
                                            if k.startswith(part + ".")} for part in ("image_proj", "ip_adapter")},
                                    low_cpu_mem_usage=False)
    direct.set_attn_processor({k: _scaled(p, 0.7) for k, p in direct.attn_processors.items()})
    torch.testing.assert_close(_run(direct, **_prompt(e)), ours, atol=1e-6, rtol=0)


def _scaled(processor, scale):
    processor.scale = scale
    return processor


def test_diffusers_sd3_file_reads_back_into_peftkit(tmp_path):
    model = _ip()
    state = ip_adapter_state_dict(model)
    fresh = peftkit.get_peft_model(_base(), LoraConfig(r=2, target_modules=["to_q"]), adapter_name="lora")
    load_ip_adapter_file(fresh, state, adapter_name="ip")  # added with the sizes the file fixes
    assert {k: getattr(fresh.peft_config["ip"], k) for k in SIZES} == SIZES
    fresh.base_model.set_adapter("ip")
    set_ip_adapter_scale(fresh, 0.7)
    e = _embeds()
    assert torch.equal(_run(fresh, **_prompt(e)), _run(model, **_prompt(e)))
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    bad = {**state, "ip_adapter.1.norm_q.weight": state["ip_adapter.1.norm_q.weight"][:-1]}
    with pytest.raises(ValueError, match=r"ip_adapter.1.norm_q.weight: file shape \(7,\), model \(8,\)"):
        load_ip_adapter_file(fresh, bad, adapter_name="ip")
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # checked before any copy
    other = peftkit.get_peft_model(_base(), LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="ip_adapter.0.norm_q.weight: file shape"):
        load_ip_adapter_file(other, {**state, "ip_adapter.0.norm_q.weight": torch.ones(7)}, adapter_name="ip")
    assert "ip" not in other.peft_config  # the adapter the failed load added is gone


def test_diffusers_sd3_file_needs_depth_four_and_every_attention():
    with pytest.raises(ConfigError, match="resampler_depth: diffusers' SD3 IP-Adapter loader builds a resampler of "
                                          "depth 4, got 2"):
        ip_adapter_state_dict(_ip(resampler_depth=2))
    with pytest.raises(ValueError, match=r"every attention processor adapted.*transformer_blocks.0.attn"):
        ip_adapter_state_dict(_ip(target_modules=["transformer_blocks.1.attn"]))


def test_sd35_dual_attention_blocks_with_qk_norm_match_the_pipeline(tmp_path):
    """SD3.5's layout: a block with a second, self-only attention (attn2) and RMS q / k norms; diffusers numbers
    attn2 between the blocks' attn, and the adapter's file lands there."""
    def dual():
        torch.manual_seed(0)
        return tiny_models.sd3(dual_attention_layers=(0,), qk_norm="rms_norm").eval()

    model = peftkit.get_peft_model(dual(), IPAdapterConfig(**SIZES, scale=0.6))
    assert [p for p, _ in model.base_model.adapter_layers()] == [ATTN[0], ATTN[0] + "2", ATTN[1]]
    torch.manual_seed(3)
    nudge_trainable(model, 0.2)
    model.eval()
    save_ip_adapter(model, str(tmp_path))
    pipe = _pipeline(dual())
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    e = _embeds()
    ours, base = _run(model, **_prompt(e)), _run(dual())
    torch.testing.assert_close(_run(pipe.transformer, **_prompt(e)), ours, atol=1e-6, rtol=0)
    assert torch.equal(_run(model), base) and (ours - base).abs().max() > 1e-2
