"""IP-Adapter: config checks, decoupled cross-attention by hand, the image prompt's argument, gradients, and
diffusers' IP-Adapter file both ways (StableDiffusionPipeline.load_ip_adapter gives the same outputs)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import IPAdapterConfig, LoraConfig, PeftModel, save_ip_adapter, set_ip_adapter_scale
from peftkit.config import ConfigError
from peftkit.methods.ip_adapter import IPAdapterLayer, ip_adapter_state_dict, load_ip_adapter_file
from peftkit.methods.ip_adapter.wrapper import image_prompt_scope
from peftkit.targeting import NotApplicableError, TargetError
from peftkit.tiny_models import unet

from ..families import FAMILY, nudge_trainable

D, C = 24, 16  # image embedding width, the tiny UNet's text width (cross_attention_dim)
# the tiny UNet's cross-attentions in diffusers' attn_processors order, with their widths d (to_k: C -> d)
ATTN2 = [("down_blocks.0.attentions.0.transformer_blocks.0.attn2", 16),
         ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 16),
         ("up_blocks.1.attentions.1.transformer_blocks.0.attn2", 16),
         ("mid_block.attentions.0.transformer_blocks.0.attn2", 32)]


def _unet():
    torch.manual_seed(0)
    return unet().eval()


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(4)
    return {"sample": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500][:batch]),
            "encoder_hidden_states": torch.randn(batch, 5, C, generator=g)}


def _embeds(batch: int = 2, seed: int = 7):
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))


def _ip(name: str = "default", nudge: float = 0.2, **kwargs):
    model = peftkit.get_peft_model(_unet(), IPAdapterConfig(image_embed_dim=D, **kwargs), adapter_name=name)
    torch.manual_seed(3)
    nudge_trainable(model, nudge)
    return model.eval()


@torch.no_grad()
def _run(model, **kwargs):
    return model(**_inputs(), **kwargs).sample


@pytest.fixture(scope="module")
def base_out():
    return _run(_unet())


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"image_embed_dim": 0}, "image_embed_dim"), ({"num_tokens": 2.0}, "num_tokens"), ({"num_tokens": 0}, "num_tokens"),
    ({"scale": "1"}, "scale"), ({"scale": math.inf}, "scale"), ({"init_weights": 1}, "init_weights"),
])
def test_bad_values_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=f"IPAdapterConfig.{field}"):
        IPAdapterConfig(**kwargs)


def test_defaults_are_the_papers():
    cfg = IPAdapterConfig()
    assert (cfg.image_embed_dim, cfg.num_tokens, cfg.scale, cfg.init_weights) == (1024, 4, 1.0, True)
    assert cfg.peft_type == "IP_ADAPTER" and peftkit.get_method("ip_adapter").category == "additive"


@pytest.mark.parametrize("family", ["bert", "llama", "t5", "clip"])
def test_models_without_diffusers_cross_attention_are_not_applicable(family):
    model = FAMILY[family].model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotApplicableError, match="IP-Adapter.*cross-attention"):
        peftkit.get_peft_model(model, IPAdapterConfig())
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in
                                                              model.state_dict().items())


def test_targets_other_than_cross_attention_are_refused_with_the_model_untouched():
    model = _unet()
    with pytest.raises(TargetError, match="target_modules.*attn1"):
        peftkit.get_peft_model(model, IPAdapterConfig(target_modules=["attn1"]))
    assert not any(isinstance(m, IPAdapterLayer) for m in model.modules())


def test_structure_init_and_trainable_parameters():
    model = peftkit.get_peft_model(_unet(), IPAdapterConfig(image_embed_dim=D))
    plain = dict(_unet().named_modules())
    layers = [(p, m) for p, m in model.get_base_model().named_modules() if isinstance(m, IPAdapterLayer)]
    assert [p for p, _ in layers] == [p for p, _ in ATTN2]
    for path, layer in layers:  # the paper: W'_k, W'_v start as W_k, W_v
        proc = layer.adapters["default"].processor
        assert torch.equal(proc.to_k_ip[0].weight, plain[path].to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, plain[path].to_v.weight)
    projs = {id(layer.adapters["default"].image_proj) for _, layer in layers}
    assert len(projs) == 1  # one projection per adapter, the same module in every layer
    n = 4
    expected = sum(2 * C * d for _, d in ATTN2) + D * n * C + n * C + 2 * C
    assert model.get_nb_trainable_parameters()[0] == expected == 4 * 2 * C * 16 + 2 * C * 16 + D * 4 * C + 4 * C + 2 * C
    trainable = sorted({n.split("adapters.default.")[-1] for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["image_proj.image_projection_layers.0.image_embeds.bias",
                         "image_proj.image_projection_layers.0.image_embeds.weight",
                         "image_proj.image_projection_layers.0.norm.bias",
                         "image_proj.image_projection_layers.0.norm.weight",
                         "processor.to_k_ip.0.weight", "processor.to_v_ip.0.weight"]


def test_no_image_prompt_scale_zero_or_disabled_give_the_base_bit_for_bit(base_out):
    model = _ip()
    assert torch.equal(_run(model), base_out)
    with_prompt = _run(model, ip_adapter_image_embeds=_embeds())
    assert (with_prompt - base_out).abs().max() > 1e-2
    with model.disable_adapter():
        assert torch.equal(_run(model, ip_adapter_image_embeds=_embeds()), base_out)
    set_ip_adapter_scale(model, 0.0)
    assert torch.equal(_run(model, ip_adapter_image_embeds=_embeds()), base_out)
    assert model.peft_config["default"].scale == 0.0


def test_diffusers_added_cond_kwargs_is_the_same_image_prompt():
    model = _ip()
    e = _embeds()
    ours = _run(model, ip_adapter_image_embeds=e)
    assert torch.equal(_run(model, added_cond_kwargs={"image_embeds": [e[:, None]]}), ours)
    assert torch.equal(_run(model, ip_adapter_image_embeds=e[:, None]), ours)  # (B, 1, D) is (B, D)


def _heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _attend(q, k, v, h):
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return (w @ v).transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1])


@torch.no_grad()
def test_decoupled_cross_attention_by_hand():
    """Z = Attn(Q, K_t, V_t) + lambda Attn(Q, K_i, V_i), K_i = c W'_k, V_i = c W'_v, c = LN(W e + b) (N tokens)."""
    model = _ip(scale=0.7)
    path = ATTN2[3][0]
    layer = model.get_base_model().get_submodule(path)
    attn, adapter = layer.base_layer, layer.adapters["default"]
    g = torch.Generator().manual_seed(9)
    x, text, e = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, C, generator=g), _embeds()
    proj = adapter.projection
    c = torch.nn.functional.layer_norm((e @ proj.image_embeds.weight.T + proj.image_embeds.bias).view(2, 4, C), (C,),
                                       proj.norm.weight, proj.norm.bias)
    q = attn.to_q(x)
    z = _attend(q, attn.to_k(text), attn.to_v(text), attn.heads)
    z = z + 0.7 * _attend(q, adapter.processor.to_k_ip[0](c), adapter.processor.to_v_ip[0](c), attn.heads)
    expected = attn.to_out[0](z)
    with image_prompt_scope({"default": e[:, None]}):
        got = layer(x, encoder_hidden_states=text)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(layer(x, encoder_hidden_states=text), attn(x, encoder_hidden_states=text))  # no prompt: base


@torch.no_grad()
def test_two_active_adapters_add_their_image_branches():
    model = _ip("a")
    model.add_adapter("b", IPAdapterConfig(image_embed_dim=D, scale=0.5))
    torch.manual_seed(5)
    nudge_trainable(model, 0.2)
    layer = model.get_base_model().get_submodule(ATTN2[0][0])
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 64, 16, generator=g), torch.randn(2, 5, C, generator=g)
    prompts = {"a": _embeds(seed=1)[:, None], "b": _embeds(seed=2)[:, None]}
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        model.base_model.set_adapter(names)
        with image_prompt_scope({n: prompts[n] for n in names}):
            outs[tuple(names)] = layer(x, encoder_hidden_states=text)
    base = layer.base_layer(x, encoder_hidden_states=text)
    torch.testing.assert_close(outs[("a", "b")], outs[("a",)] + outs[("b",)] - base, atol=1e-5, rtol=1e-5)
    # through the model: one tensor for both adapters, a list in their order, or a dict by name
    e = _embeds()
    same = _run(model, ip_adapter_image_embeds=e)
    assert torch.equal(_run(model, ip_adapter_image_embeds=[e, e]), same)
    assert torch.equal(_run(model, ip_adapter_image_embeds={"a": e, "b": e}), same)


@pytest.mark.parametrize(("embeds", "match"), [
    (torch.randn(2, 5), r"ip_adapter_image_embeds: .*expects a float tensor \(batch, 24\) or \(batch, images, 24\) "
                        r"with batch = 2.*got shape \(2, 5\)"),
    (torch.randn(3, D), r"ip_adapter_image_embeds: .*with batch = 2 \(one image prompt per batch row\), got shape \(3, 24\)"),
    (torch.randn(2, 1, 1, D), r"ip_adapter_image_embeds: .*got shape \(2, 1, 1, 24\)"),
    (torch.ones(2, D, dtype=torch.long), r"ip_adapter_image_embeds: .*got a torch.int64 tensor"),
    ([torch.randn(2, D)] * 2, r"ip_adapter_image_embeds: expected one image prompt per active IP-Adapter adapter"),
])
def test_a_wrong_image_prompt_names_the_argument_and_the_expected_shape(embeds, match):
    model = _ip()
    with pytest.raises(ValueError, match=match):
        _run(model, ip_adapter_image_embeds=embeds)


def test_only_the_projection_and_the_image_keys_values_get_gradients():
    model = _ip().train()
    out = model(**_inputs(), ip_adapter_image_embeds=_embeds()).sample
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    grads = {n.split("adapters.default.")[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert {g.split(".")[0] for g in grads} == {"image_proj", "processor"}


def test_merge_is_refused():
    model = _ip()
    with pytest.raises(NotImplementedError, match="IP-Adapter cannot be merged"):
        model.merge_adapter()


def test_peftkit_file_keys_and_round_trip(tmp_path):
    model = _ip()
    expected = _run(model, ip_adapter_image_embeds=_embeds())
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    proj = {f"base_model.image_proj.{k}.{w}" for k in ("image_embeds", "norm") for w in ("weight", "bias")}
    assert keys == proj | {f"base_model.model.{p}.to_{m}_ip.weight" for p, _ in ATTN2 for m in "kv"}
    loaded = PeftModel.from_pretrained(_unet(), tmp_path)
    assert torch.equal(_run(loaded, ip_adapter_image_embeds=_embeds()), expected)


def _pipeline(unet_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet_model, image_encoder=None,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_diffusers_file_loads_into_a_stable_diffusion_pipeline_with_equal_outputs(tmp_path):
    model = _ip()
    path = save_ip_adapter(model, str(tmp_path))
    keys = set(load_file(path))
    assert keys == {f"image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")} | {
        f"ip_adapter.{2 * i + 1}.to_{m}_ip.weight" for i in range(4) for m in "kv"}
    pipe = _pipeline(_unet())
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    assert list(pipe.unet.attn_processors)[1::2] == [f"{p}.processor" for p, _ in ATTN2]  # diffusers' numbering
    e = _embeds()
    ours = _run(model, ip_adapter_image_embeds=e)
    with torch.no_grad():
        theirs = pipe.unet(**_inputs(), added_cond_kwargs={"image_embeds": [e[:, None]]}).sample
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    assert (ours - _run(_unet())).abs().max() > 1e-2  # the adapter acts: the match is not base == base


def test_diffusers_file_reads_back_into_peftkit(tmp_path):
    model = _ip()
    state = ip_adapter_state_dict(model)
    fresh = peftkit.get_peft_model(_unet(), LoraConfig(r=2, target_modules=["to_q"]), adapter_name="lora")
    load_ip_adapter_file(fresh, state, adapter_name="ip")  # added from the file: D and 4 tokens
    assert fresh.peft_config["ip"].image_embed_dim == D
    fresh.base_model.set_adapter("ip")
    e = _embeds()
    assert torch.equal(_run(fresh, ip_adapter_image_embeds=e), _run(model, ip_adapter_image_embeds=e))
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    bad = {**state, "image_proj.norm.weight": state["image_proj.norm.weight"][:-1]}
    with pytest.raises(ValueError, match=r"image_proj.norm.weight: file shape \(15,\), model \(16,\)"):
        load_ip_adapter_file(fresh, bad, adapter_name="ip")
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # checked before any copy


def test_diffusers_file_needs_four_tokens_and_every_cross_attention():
    with pytest.raises(ConfigError, match="num_tokens: diffusers' IP-Adapter file has 4"):
        ip_adapter_state_dict(_ip(num_tokens=2))
    partial = _ip(target_modules=["mid_block.attentions.0.transformer_blocks.0.attn2"])
    with pytest.raises(ValueError, match="every cross-attention adapted.*down_blocks.0"):
        ip_adapter_state_dict(partial)


# -- peftkit train: configs/digits_ip_adapter.yaml, shortened (a random tiny CLIP as the image encoder) ---------------
def _train_recipe(root):
    import yaml

    recipe = yaml.safe_load(open("configs/digits_ip_adapter.yaml"))
    recipe["model"] = "unet-tiny"  # random weights: tests never pre-train unet-tiny-digits
    recipe["data"].update(image_size=8, train_rows=300, test_rows=60)
    recipe["train"].update(max_steps=12, lr=1e-2, log_every=4, save_every=0, eval_batch_size=64)
    recipe["output_dir"] = str(root / "run")
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml")


@pytest.fixture
def quick_task(monkeypatch):
    from peftkit.train import ip_adapter_task as T

    monkeypatch.setattr(T.IPAdapterDiffusionTask, "image_encoder", "clip-tiny")
    monkeypatch.setattr(T.IPAdapterDiffusionTask, "samples_per_label", 1)
    monkeypatch.setattr(T.IPAdapterDiffusionTask, "sample_steps", 2)
    return T


def test_the_image_prompt_of_a_training_image_is_another_image_of_its_digit(tmp_path, quick_task):
    from peftkit.train.recipe import load_recipe
    from peftkit.train.tasks import TASKS

    task = TASKS["diffusion"](load_recipe(_train_recipe(tmp_path)))
    assert type(task) is quick_task.IPAdapterDiffusionTask  # task diffusion, method ip_adapter
    task.load_data()
    task.load_model()
    torch.manual_seed(0)
    batch = task.batch(list(range(32)))
    emb = task.train_embeds
    for i, e in enumerate(batch["image_embeds"]):
        j = int((emb == e).all(1).nonzero()[0, 0])
        assert j != i and task.train_y[j] == task.train_y[i]
    assert torch.equal(batch["encoder_hidden_states"], task.cond.expand(32, -1, -1))  # one text for every image


def test_peftkit_train_runs_the_recipe_and_its_diffusers_file_loads(tmp_path, quick_task):
    from peftkit.train.commands import load_trained
    from peftkit.train.diffusion import unet_tiny
    from peftkit.train.loop import train
    from peftkit.train.recipe import load_recipe

    summary = train(load_recipe(_train_recipe(tmp_path)), quiet=True)
    run = tmp_path / "run"
    c = 32  # unet-tiny's text width; cross-attention widths 16 (down), 32 (mid), 16, 16 (up)
    assert summary["trainable_params"] == 32 * 4 * c + 4 * c + 2 * c + 2 * c * (16 + 32 + 16 + 16)
    assert summary["test_loss"] < summary["before_test_loss"]
    for key in ("test_loss_wrong_prompt", "sample_accuracy", "sample_accuracy_adapter_off"):
        assert 0 <= summary[key] and f"before_{key}" in summary
    assert summary["sample_accuracy_adapter_off"] == summary["before_sample_accuracy_adapter_off"]  # base unchanged
    for name in ("samples_adapter_on.png", "samples_adapter_off.png", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file()

    model, task = load_trained(str(run))
    model.eval()
    pipe = _pipeline(unet_tiny(8))
    pipe.load_ip_adapter(str(run / "diffusers_ip_adapter"), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder=None)
    g = torch.Generator().manual_seed(3)
    x, t, e = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 32, generator=g)
    cond = task.cond.expand(2, -1, -1)
    with torch.no_grad():
        ours = model(x, t, encoder_hidden_states=cond, ip_adapter_image_embeds=e).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs={"image_embeds": [e[:, None]]}).sample
        base = unet_tiny(8)(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    assert (ours - base).abs().max() > 1e-3
