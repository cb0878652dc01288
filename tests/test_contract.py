"""The contract every registered method keeps, on every model family (DESIGN.md section 3 item 9).

Parametrized over the registry's examples x the families: a new method is covered by registering it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import Adapter, AdapterLayer, PeftModel, get_peft_model
from peftkit.targeting import NotApplicableError

from .families import FAMILIES

CASES = [(spec, name, kwargs) for spec in peftkit.list_methods() for name, kwargs in spec.examples]


def make_config(spec, kwargs, family):
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    extra = {}
    if "target_modules" in fields and family.targets is not None:
        extra["target_modules"] = family.targets
    if family.task_type:
        extra["task_type"] = family.task_type
    return spec.config_cls(**kwargs, **extra)


def unsupported_targets(spec, family):
    """Layer types a family's explicit targets need that the method declares it cannot wrap (sorted names)."""
    if family.targets is None:
        return []
    supported = spec.adapter_cls.supported_layers
    named = family.model().named_modules()
    return sorted({
        type(m).__name__ for n, m in named
        if any(n == t or n.endswith("." + t) for t in family.targets) and not isinstance(m, supported)
    })


@torch.no_grad()
def perturb(model):
    """Give every adapter parameter non-trivial values (identity-at-init would hide bugs)."""
    g = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, Adapter):
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}


@pytest.fixture(params=CASES, ids=[f"{s.name}-{n}" for s, n, _ in CASES])
def case(request):
    return request.param


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request):
    return request.param


@pytest.fixture
def wrapped(case, family):
    spec, _, kwargs = case
    unsupported = unsupported_targets(spec, family)
    if unsupported:
        pytest.skip(f"{spec.name} does not wrap {unsupported} (supported_layers), which {family.name} targets")
    chosen = set(kwargs.get("token_indices", ()))
    if chosen:  # trainable tokens act on their own token ids only
        torch.manual_seed(1)  # family.run's draw
        ids = family.inputs().get("input_ids")
        if ids is not None and not chosen & set(ids.flatten().tolist()):
            pytest.skip(f"{spec.name}: {family.name}'s inputs hold none of the example's token ids")
    base_out = family.run(family.model())
    try:
        model = get_peft_model(family.model(), make_config(spec, kwargs, family)).eval()
    except NotApplicableError as err:  # the model lacks what the method acts on (BitFit on bias-free Llama / T5)
        pytest.skip(str(err))
    return model, base_out


def test_starts_at_base(wrapped, family, case):
    if not case[0].starts_at_base:
        pytest.skip("the method acts from the start (registry: starts_at_base=False)")
    model, base_out = wrapped
    torch.testing.assert_close(family.run(model), base_out, atol=1e-4, rtol=1e-4)


def test_merged_equals_unmerged_and_unmerge_restores_bits(wrapped, family, case):
    if not case[0].mergeable:
        pytest.skip("method is not mergeable")
    model, _ = wrapped
    perturb(model)
    before = base_weights(model)
    unmerged = family.run(model)
    model.merge_adapter()
    torch.testing.assert_close(family.run(model), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    after = base_weights(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    torch.testing.assert_close(family.run(model), unmerged, atol=0, rtol=0)


def test_merge_and_unload_equals_unmerged(wrapped, family, case):
    if not case[0].mergeable:
        pytest.skip("method is not mergeable")
    model, _ = wrapped
    perturb(model)
    unmerged = family.run(model)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(family.run(plain), unmerged, atol=1e-5, rtol=1e-5)


def test_disable_gives_base(wrapped, family, case):
    model, base_out = wrapped
    perturb(model)
    if case[2].get("init_lora_weights") in ("pissa", "olora"):
        base_out = family.run(copy.deepcopy(model).unload())  # the frozen base holds the residual by design
    with model.disable_adapter():
        torch.testing.assert_close(family.run(model), base_out, atol=1e-6, rtol=1e-5)
    out = family.run(model)  # prompt methods may lengthen the output (one position per virtual token)
    assert out.shape != base_out.shape or not torch.allclose(out, base_out)


def test_save_load_round_trip(wrapped, family, case, tmp_path):
    model, _ = wrapped
    perturb(model)
    # both runs without autograd: kernels may depend on it (SDPA on CPU picks another kernel when the
    # attention bias requires grad, as it does when a method trains T5's relative_attention_bias)
    with torch.no_grad():
        expected = family.run(model)
    model.save_pretrained(tmp_path)
    fresh = family.model()
    if case[2].get("init_lora_weights") in ("pissa", "olora"):  # load onto the residual base it was trained on
        fresh = copy.deepcopy(model).unload()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def test_only_adapter_parameters_get_gradients(wrapped, family):
    model, _ = wrapped
    perturb(model)
    model.train()
    family.run(model).float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    adapter_params = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params]
    assert all(".modules_to_save." in n for n in extra), extra


# -- closed-form trainable-parameter counts -------------------------------------------------------------------
# Written from each method's math on one adapted layer with fan-in d_in (a convolution: in_channels / groups x
# kernel area), d_out outputs, c_in / c_out channels; not from peftkit's own param_count. Methods not in the
# table yet (prompt tokens, bottleneck adapters, selective masks, LoKr's factorisation, the CLIP methods) are
# checked against the closed form their adapter class declares (``param_count``: computed from the config and
# the layer's shape, never from the built tensors), so the count is checked for every example.
def _dims(base):
    """(d_in, d_out, c_in, c_out) of a base layer, read from its type's own fields."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, base.in_features, base.out_features
    if isinstance(base, Conv1D):  # GPT-2: weight stored (d_in, d_out)
        return base.weight.shape[0], base.weight.shape[1], base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, nn.modules.conv._ConvNd):
        fan_in = base.in_channels // base.groups * math.prod(base.kernel_size)
        return fan_in, base.out_channels, base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim, base.num_embeddings, base.embedding_dim
    raise AssertionError(f"no closed form for a {type(base).__name__}")


def _norm_params(base):
    return sum(p.numel() for p in base.parameters(recurse=False))


def _lora(r):  # A: r x d_in, B: d_out x r
    return lambda d_in, d_out, c_in, c_out, ff: r * (d_in + d_out)


CLOSED_FORM = {
    "lora": _lora(4),
    "rslora": _lora(4),
    "pissa": _lora(4),
    "dora": lambda d_in, d_out, c_in, c_out, ff: 4 * (d_in + d_out) + d_out,  # + the magnitude vector
    "adalora": lambda d_in, d_out, c_in, c_out, ff: 4 * (d_in + d_out) + 4,  # P, Q and the init_r singular values
    "loha": lambda d_in, d_out, c_in, c_out, ff: 2 * 4 * (d_in + d_out),  # two rank-4 pairs, Hadamard product
    "ia3": lambda d_in, d_out, c_in, c_out, ff: c_in if ff else c_out,  # one scale per input / output channel
    "hira": _lora(2),  # A: r x d_in, B: d_out x r (the update W0 * BA is of high rank)
    "shira": _lora(2),  # r (d_in + d_out) entries of the weight, LoRA's count
    "miss": lambda d_in, d_out, c_in, c_out, ff: 4 * d_out,  # one (r, d_out) block shared by the r-wide shards
    "vera": lambda d_in, d_out, c_in, c_out, ff: 4 + d_out,  # lambda_d (r) and lambda_b; A and B frozen, shared
    "vera-seed": lambda d_in, d_out, c_in, c_out, ff: 6 + d_out,
    "fourierft": lambda d_in, d_out, c_in, c_out, ff: 16,  # n_frequency spectral coefficients
    # r = 1 block of size d_in: its d_in (d_in - 1) / 2 skew-symmetric entries
    "oft": lambda d_in, d_out, c_in, c_out, ff: d_in * (d_in - 1) // 2,
    "coft": lambda d_in, d_out, c_in, c_out, ff: d_in * (d_in - 1) // 2,
    # one butterfly factor, one block of size d_in (the full d_in x d_in matrix, Cayley of its skew part)
    # and one output scale per output
    "boft": lambda d_in, d_out, c_in, c_out, ff: d_in * d_in + d_out,
    "ssf": None,  # per layer: a scale and a shift per output channel (norm layers: per normalized feature)
    "ln_tuning": None,  # per layer: a trained copy of the norm layer's weight and bias
    "bitfit": None,  # per layer: its bias
    "last_k": None,  # per layer of the last k blocks: all its own parameters
    "prompt_tuning": None,  # n virtual tokens x the embedding width (x 2 for an encoder-decoder's two stacks)
    "coop": None,  # n context vectors x the text tower's embedding width (one context for all classes)
    "vpt-deep": None,  # per block: p prompt tokens x the hidden width
    # prefix tuning: n x 2 L d (a key and a value vector per token and layer); with the projection, the n x d
    # embedding and a two-layer MLP d -> h -> 2 L d with biases
    "prefix": None,
    "prefix-projection": None,
    "p_tuning_v2": None,
    "adaption_prompt": None,  # per adapted attention: adapter_len x hidden prompts and one gate
    "tip_adapter": None,  # Tip-Adapter-F: the cache's N K keys x the feature width
    "clip_adapter": None,  # per adapted feature: a D -> D / r -> D bottleneck without biases (r = 4)
}


def _per_layer(example, base, adapter, config) -> int:
    if example == "bitfit":
        return base.bias.numel()
    if example == "last_k":
        return _norm_params(base)
    if example == "prompt_tuning":
        return config.num_virtual_tokens * (config.num_transformer_submodules or 1) * base.embedding_dim
    if example == "coop":
        return config.num_virtual_tokens * base.embedding_dim
    if example in ("prefix", "p_tuning_v2"):
        return config.num_virtual_tokens * 2 * config.num_layers * config.token_dim
    if example == "prefix-projection":
        n, d, L, h = config.num_virtual_tokens, config.token_dim, config.num_layers, config.encoder_hidden_size
        return n * d + (d * h + h) + (h * 2 * L * d + 2 * L * d)
    if example == "adaption_prompt":
        return config.adapter_len * base.config.hidden_size + 1
    if example == "tip_adapter":
        return config.cache_size * base.out_features
    if example == "clip_adapter":
        return 2 * base.out_features * max(1, base.out_features // 4)
    if example == "vpt-deep":
        return config.num_virtual_tokens * config.token_dim
    if example == "ssf":
        return 2 * (base.normalized_shape[-1] if hasattr(base, "normalized_shape") else
                    base.num_features if hasattr(base, "num_features") else
                    base.num_channels if isinstance(base, nn.GroupNorm) else _dims(base)[3])
    if example == "ln_tuning":
        return _norm_params(base)
    return CLOSED_FORM[example](*_dims(base), getattr(adapter, "feedforward", False))


def test_parameter_count_matches_closed_form(wrapped, case):
    model, _ = wrapped
    spec, example = case[0], case[1]
    config = model.peft_config["default"]
    expected = sum(_per_layer(example, layer.base_layer, layer.adapters["default"], config) if example in CLOSED_FORM
                   else spec.adapter_cls.param_count(layer.base_layer, config, path)
                   for path, layer in model.base_model.adapter_layers())
    for _, wrapper in model.base_model.saved_modules():  # a trained copy of each saved module (a task head)
        expected += sum(p.numel() for p in wrapper.modules_to_save["default"].parameters())
    # adapter-level state that trains (VB-LoRA's vector bank, Uni-LoRA's theta_d): once per adapter, not per target
    if "default" in model.base_model.shared_state:
        expected += sum(t.numel() for t in model.base_model.shared_state["default"].tensors().values()
                        if t.requires_grad)
    trainable, total = model.get_nb_trainable_parameters()
    assert expected > 0 and trainable == expected
    assert total == sum(p.numel() for p in model.parameters())
