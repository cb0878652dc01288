"""The contract every registered method keeps, on every model family (DESIGN.md section 3 item 9).

Parametrized over the registry's examples x the families: a new method is covered by registering it. One test
per (example, family) builds the adapted model once and checks each clause of the contract as a subtest.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import peftkit
from peftkit import Adapter, AdapterLayer, PeftModel, get_peft_model
from peftkit.targeting import NotApplicableError

from .closed_form_parts import Adapted, Site
from .closed_forms import CLOSED_FORM
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
    return sorted({
        cls.__name__ for n, cls in family.module_types().items()
        if any(n == t or n.endswith("." + t) for t in family.targets) and not issubclass(cls, supported)
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


def build(case, family):
    """The adapted model of one case (its base output beside it), or a skip naming why the case does not apply."""
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
    base_out = family.base_output()
    try:
        model = get_peft_model(family.model(), make_config(spec, kwargs, family)).eval()
    except NotApplicableError as err:  # the model lacks what the method acts on (BitFit on bias-free Llama / T5)
        pytest.skip(str(err))
    return model, base_out


def test_contract(case, family, subtests, tmp_path):
    """Every clause of the contract on one adapted model, built once. Each clause is a subtest (a failure names
    it, and the others still run); the clauses that only read the model come first, then those that perturb,
    train, merge and finally unload it."""
    spec, name, kwargs = case
    model, base_out = build(case, family)
    with subtests.test("parameter count matches its closed form"):
        check_parameter_count(model, name, family)
    if spec.starts_at_base:
        with subtests.test("starts at the base"):
            torch.testing.assert_close(family.run(model), base_out, atol=1e-4, rtol=1e-4)
    perturb(model)
    with subtests.test("disable gives the base"):
        check_disable(model, family, kwargs, base_out)
    with subtests.test("save / load round trip"):
        check_round_trip(model, family, kwargs, tmp_path)
    with subtests.test("only adapter parameters get gradients"):
        check_gradients(model, family)
    if spec.mergeable:
        with subtests.test("merged equals unmerged, unmerge restores the bits"):
            check_merge_unmerge(model, family)
        with subtests.test("merge_and_unload equals unmerged"):
            check_merge_and_unload(model, family)


def check_disable(model, family, kwargs, base_out):
    if kwargs.get("init_lora_weights") in ("pissa", "olora"):
        base_out = family.run(copy.deepcopy(model).unload())  # the frozen base holds the residual by design
    with model.disable_adapter():
        torch.testing.assert_close(family.run(model), base_out, atol=1e-6, rtol=1e-5)
    out = family.run(model)  # prompt methods may lengthen the output (one position per virtual token)
    assert out.shape != base_out.shape or not torch.allclose(out, base_out)


def check_round_trip(model, family, kwargs, tmp_path):
    # both runs without autograd: kernels may depend on it (SDPA on CPU picks another kernel when the
    # attention bias requires grad, as it does when a method trains T5's relative_attention_bias)
    with torch.no_grad():
        expected = family.run(model)
    model.save_pretrained(tmp_path)
    fresh = family.model()
    if kwargs.get("init_lora_weights") in ("pissa", "olora"):  # load onto the residual base it was trained on
        fresh = copy.deepcopy(model).unload()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(family.run(loaded), expected, atol=0, rtol=0)


def check_gradients(model, family):
    model.train()
    try:
        family.run(model).float().pow(2).mean().backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, "nothing trainable"
        unreached = type(next(m for m in model.modules() if isinstance(m, Adapter))).unreached_params(model)
        for name, p in model.named_parameters():
            if name in unreached or not family.reaches(name):
                continue
            if name in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            else:
                assert p.grad is None, f"frozen {name} got a gradient"
        adapter_params = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
        extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params]
        assert all(".modules_to_save." in n for n in extra), extra
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def check_merge_unmerge(model, family):
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


def check_merge_and_unload(model, family):
    unmerged = family.run(model)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(family.run(plain), unmerged, atol=1e-5, rtol=1e-5)


# -- closed-form trainable-parameter counts -------------------------------------------------------------------
# Written in tests/closed_forms.py from each method's math (one adapted layer's dims, the example's config, the
# plain model for the selective methods), never from peftkit's own param_count: every example must have one.
@pytest.mark.parametrize("example", sorted({name for _, name, _ in CASES}))
def test_parameter_count_closed_form_exists(example):
    if example not in CLOSED_FORM:
        pytest.fail(f"registry example {example!r} has no closed-form trainable-parameter count: add one to "
                    "CLOSED_FORM in tests/closed_forms.py, written from the method's math (not from its param_count)")


def check_parameter_count(model, example, family):
    config = model.peft_config["default"]
    saved = list(model.base_model.saved_modules())
    adapted = Adapted(
        cfg=config,
        sites=[Site(path, layer.base_layer, config) for path, layer in model.base_model.adapter_layers()],
        plain=family.model,
        heads=[*(getattr(config, "modules_to_save", None) or []), *(path for path, _ in saved)],
    )
    expected = CLOSED_FORM[example](adapted)
    for _, wrapper in saved:  # a trained copy of each saved module (a task head)
        expected += sum(p.numel() for p in wrapper.modules_to_save["default"].parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert expected > 0 and trainable == expected
    assert total == sum(p.numel() for p in model.parameters())
