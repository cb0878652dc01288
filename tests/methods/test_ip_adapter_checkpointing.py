"""IP-Adapter under diffusers' gradient checkpointing: the image tokens travel with the blocks' arguments, so the
recomputation in backward runs the image branch too, and the loss and every trainable gradient equal those without
checkpointing (UNet2DConditionModel and SD3Transformer2DModel, tiny). Concurrent calls each see their own image
prompt; a base whose forward cannot carry the tokens, and reentrant checkpointing, are refused at the forward."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import peftkit
from peftkit import IPAdapterConfig
from peftkit.methods.ip_adapter import IPAdapterLayer
from peftkit.tiny_models import unet

from ..families import nudge_trainable
from ..test_diffusion_transformer_methods import CTX, POOL, T, X, sd3_tiny

D = 24  # image embedding width (UNet) / image feature width (SD3)
SD3_SIZES = dict(image_embed_dim=D, num_tokens=4, resampler_dim=16, resampler_heads=1, timestep_in_dim=8, scale=0.7)


def _embeds(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unet_inputs():
    g = torch.Generator().manual_seed(4)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}


def _unet_ip(*names):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(unet(), IPAdapterConfig(image_embed_dim=D, scale=0.8), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, IPAdapterConfig(image_embed_dim=D, scale=0.5))
    model.base_model.set_adapter(list(names))
    torch.manual_seed(3)
    nudge_trainable(model, 0.2)
    return model


def _sd3_ip():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(sd3_tiny(), IPAdapterConfig(**SD3_SIZES))
    torch.manual_seed(3)
    nudge_trainable(model, 0.2)
    return model


def _sd3_run(model):
    return model(hidden_states=X, encoder_hidden_states=CTX, pooled_projections=POOL, timestep=T,
                 joint_attention_kwargs={"ip_adapter_image_embeds": _embeds((2, 6, D), 7)}).sample


def _unet_case(names, prompt):
    return _unet_ip(*names), lambda m: m(**_unet_inputs(), **prompt).sample


CASES = {
    "unet": lambda: _unet_case(["default"], {"ip_adapter_image_embeds": _embeds((2, D), 7)}),
    # two IP-Adapters, two images per row for one of them, and the caller's own cross_attention_kwargs
    "unet-two-adapters": lambda: _unet_case(["a", "b"], {
        "ip_adapter_image_embeds": {"a": _embeds((2, D), 1), "b": _embeds((2, 2, D), 2)},
        "cross_attention_kwargs": {"scale": 1.0}}),
    # diffusers' own argument (the base UNet has no image projection of its own)
    "unet-added-cond-kwargs": lambda: _unet_case(["default"],
                                                 {"added_cond_kwargs": {"image_embeds": [_embeds((2, D), 5)]}}),
    "sd3": lambda: (_sd3_ip(), _sd3_run),
}


def _loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    loss = run(model).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_gives_the_same_loss_and_every_gradient(case):
    model, run = CASES[case]()
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, IPAdapterLayer))
    runs = []
    layer.register_forward_hook(lambda *a: runs.append(1))
    expected_loss, expected = _loss_and_grads(model, run)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert expected.keys() == trainable and all(g.abs().sum() > 0 for g in expected.values())
    assert len(runs) == 1
    base = model.get_base_model()
    base.enable_gradient_checkpointing()
    assert base.is_gradient_checkpointing
    runs.clear()
    loss, got = _loss_and_grads(model, run)
    assert len(runs) == 2  # the layer ran in a checkpointed block: once in forward, once recomputed in backward
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_the_image_branch_is_on_and_the_callers_kwargs_are_left_as_they_were():
    model, _ = _unet_case(["default"], {})
    kwargs = {"scale": 1.0}
    with torch.no_grad():
        with_prompt = model(**_unet_inputs(), ip_adapter_image_embeds=_embeds((2, D), 7), cross_attention_kwargs=kwargs)
        without = model(**_unet_inputs(), cross_attention_kwargs=kwargs)
        base = model.get_base_model()(**_unet_inputs())
    assert kwargs == {"scale": 1.0}
    assert torch.equal(without.sample, base.sample)
    assert (with_prompt.sample - base.sample).abs().max() > 1e-3


def test_concurrent_calls_each_get_their_own_image_prompt():
    model = _unet_ip("default").eval()
    prompts = [_embeds((2, D), 11), _embeds((2, D), 12)]
    with torch.no_grad():
        serial = [model(**_unet_inputs(), ip_adapter_image_embeds=e).sample for e in prompts]
    assert (serial[0] - serial[1]).abs().max() > 1e-3
    barrier = threading.Barrier(2, timeout=20)
    layers = [m for m in model.modules() if isinstance(m, IPAdapterLayer)]

    def meet(*_):  # both calls are inside the UNet, at the same layer, at once
        barrier.wait()

    for layer in layers:
        layer.register_forward_pre_hook(meet)
    got, errors = [None, None], []

    def call(i):
        try:
            with torch.no_grad():
                got[i] = model(**_unet_inputs(), ip_adapter_image_embeds=prompts[i]).sample
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(2):
        assert torch.equal(got[i], serial[i])


class _NoKwargsUNet(nn.Module):
    """A wrapper whose forward takes no cross_attention_kwargs: the image tokens cannot travel with the call."""

    def __init__(self):
        super().__init__()
        self.unet = unet()

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states).sample


def test_a_base_that_cannot_carry_the_tokens_refuses_gradient_checkpointing():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(_NoKwargsUNet(), IPAdapterConfig(image_embed_dim=D)).train()
    torch.manual_seed(0)
    reference = peftkit.get_peft_model(unet(), IPAdapterConfig(image_embed_dim=D))
    reference.load_state_dict({k.replace("model.unet.", "model.", 1): v for k, v in model.state_dict().items()})
    e = _embeds((2, D), 7)
    out = model(**_unet_inputs(), ip_adapter_image_embeds=e)  # no checkpointing: the call's scope
    torch.testing.assert_close(out, reference(**_unet_inputs(), ip_adapter_image_embeds=e).sample, atol=1e-6, rtol=0)
    model.get_base_model().unet.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match=r"IP-Adapter with gradient checkpointing: _NoKwargsUNet.forward takes no "
                                         r"cross_attention_kwargs.*disable_gradient_checkpointing"):
        model(**_unet_inputs(), ip_adapter_image_embeds=e)
    with torch.no_grad():  # no recomputation without gradients: allowed
        torch.testing.assert_close(model(**_unet_inputs(), ip_adapter_image_embeds=e), out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cross_attention_kwargs: expected a dict or None, got list"):
        reference(**_unet_inputs(), ip_adapter_image_embeds=e, cross_attention_kwargs=[1])


@pytest.mark.parametrize("case", ["unet", "sd3"])
def test_reentrant_checkpointing_is_refused_at_the_forward(case):
    """Reentrant checkpointing re-attaches only the blocks' tensor arguments: the image tokens' gradients could not
    come back through it (each block's backward would walk the one projection graph, freed by the first)."""
    model, run = CASES[case]()
    model.train()
    model.get_base_model().enable_gradient_checkpointing(
        functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    with pytest.raises(ValueError, match=r"reentrant gradient checkpointing \(use_reentrant=True\).*diffusers' default "
                                         r"enable_gradient_checkpointing\(\) \(non-reentrant\)"):
        run(model)
    with torch.no_grad():  # no gradients: no checkpoint runs, the call goes through
        run(model)
