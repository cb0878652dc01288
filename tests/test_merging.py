"""add_weighted_adapter and the merging functions: against Hugging Face PEFT where PEFT is right, against a
from-scratch reference of the merged delta weight where it is not (merging.py lists the differences)."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import peftkit
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.methods.lora import merging as M

from .families import FAMILY, V

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(configs: dict[str, dict]):
    """The same adapters (same values) on a peftkit and a peft model."""
    ours = theirs = None
    for name, kw in configs.items():
        kw = {"target_modules": TARGETS, "init_lora_weights": False, **kw}
        if ours is None:
            ours = get_peft_model(FAMILY["llama"].model(), LoraConfig(**kw), adapter_name=name)
            theirs = peft.get_peft_model(FAMILY["llama"].model(), peft.LoraConfig(**kw), adapter_name=name)
        else:
            ours.add_adapter(name, LoraConfig(**kw))
            theirs.add_adapter(name, peft.LoraConfig(**kw))
        torch.manual_seed(hash(name) % 1000)
        state = peftkit.get_peft_model_state_dict(ours, adapter_name=name)
        state = {k: torch.randn(v.shape) * 0.2 for k, v in sorted(state.items())}
        peftkit.set_peft_model_state_dict(ours, state, name)
        peft.set_peft_model_state_dict(theirs, state, name)
    return ours, theirs


def _deltas_ours(model, name):
    return {p: a.delta_weight(None) for p, a in model.base_model.adapters(name)}


def _deltas_peft(model, name):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m.get_delta_weight(name) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A}


def _reference(model, names, weights, fn=None):
    """Merged delta per layer from the sources' own delta weights: ``fn(deltas, weights)`` (default sum)."""
    per = [_deltas_ours(model, n) for n in names]
    fn = fn or (lambda ds, ws: sum(w * d for d, w in zip(ds, ws)))
    return {p: fn([d[p] for d in per], weights) for p in per[0]}


def _close(got: dict, expected: dict, atol=1e-5):
    assert got.keys() == expected.keys() and got
    for p in got:
        torch.testing.assert_close(got[p], expected[p], atol=atol, rtol=1e-5, msg=p)


# -- where PEFT is right: same numbers -------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "extra"), [
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.95}),
    ("ties_svd", {"density": 0.5}),
    ("ties_svd", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.4}),
])
def test_matches_peft(kind, extra):
    cfgs = {"one": {"r": 4, "lora_alpha": 8}, "two": {"r": 4 if kind == "cat" else 6, "lora_alpha": 3}}
    ours, theirs = _pair(cfgs)
    for m in (ours, theirs):
        m.add_weighted_adapter(["one", "two"], [0.7, -0.4], "merged", combination_type=kind, **extra)
    _close(_deltas_ours(ours, "merged"), _deltas_peft(theirs, "merged"))


def test_single_adapter_linear_matches_peft():
    ours, theirs = _pair({"one": {"r": 4, "lora_alpha": 8}})
    for m in (ours, theirs):
        m.add_weighted_adapter(["one"], [1.5], "merged", combination_type="linear")
    _close(_deltas_ours(ours, "merged"), _deltas_peft(theirs, "merged"))
    _close(_deltas_ours(ours, "merged"), _reference(ours, ["one"], [1.5]))


# -- where PEFT is not: the reference delta -----------------------------------------------------------
MIXED = {
    "one": {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 2}},
    "two": {"r": 6, "lora_alpha": 3, "alpha_pattern": {"down_proj": 7.0}},
}


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_linear_and_cat_are_exact_across_ranks_rslora_patterns(kind, tmp_path):
    ours, _ = _pair(MIXED)
    ours.add_weighted_adapter(["one", "two"], [0.7, -0.4], "merged", combination_type=kind)
    expected = _reference(ours, ["one", "two"], [0.7, -0.4])
    _close(_deltas_ours(ours, "merged"), expected)
    cfg = ours.peft_config["merged"]
    assert not cfg.use_rslora and cfg.r == 10
    ranks = {p: a.r for p, a in ours.base_model.adapters("merged")}
    assert ranks["model.layers.0.self_attn.v_proj"] == 8 and ranks["model.layers.0.self_attn.q_proj"] == 10
    assert all(a.scaling == 1.0 for _, a in ours.base_model.adapters("merged"))
    # the merged adapter computes base + sum_i w_i dW_i, and survives a save / load round trip
    ids = torch.randint(0, V, (2, 5))
    ours.set_adapter("merged")
    with torch.no_grad():
        out = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path, selected_adapters=["merged"])
    loaded = PeftModel.from_pretrained(FAMILY["llama"].model(), tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, out, atol=1e-5, rtol=1e-5)
    base = FAMILY["llama"].model()
    with torch.no_grad():
        for name, module in base.named_modules():
            if name in expected:
                module.weight += expected[name]
        torch.testing.assert_close(base(input_ids=ids).logits, out, atol=1e-5, rtol=1e-5)


def _ties_ref(ds, ws, density, method="total"):
    """TIES from scratch: keep the top-k magnitudes of each delta, elect the sign, average the agreeing."""
    kept = []
    for d in ds:
        k = int(density * d.numel())
        thresh = d.abs().flatten().sort(descending=True).values[k - 1]
        kept.append(torch.where(d.abs() >= thresh, d, torch.zeros_like(d)))
    stacked = torch.stack(kept)
    votes = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    sign = torch.where(votes >= 0, 1.0, -1.0)
    weighted = torch.stack([w * t for w, t in zip(ws, kept)])
    agree = stacked.sign() == sign
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_on_delta_weights(method):
    ours, _ = _pair(MIXED)
    ours.add_weighted_adapter(["one", "two"], [0.7, 0.5], "t", combination_type="ties", density=0.4,
                              majority_sign_method=method)
    _close(_deltas_ours(ours, "t"), _reference(ours, ["one", "two"], [0.7, 0.5],
                                               lambda ds, ws: _ties_ref(ds, ws, 0.4, method)))
    ours.add_weighted_adapter(["one", "two"], [0.7, 0.5], "ts", combination_type="ties_svd", density=0.4,
                              majority_sign_method=method, svd_rank=64)
    _close(_deltas_ours(ours, "ts"), _deltas_ours(ours, "t"))


def test_magnitude_prune_on_delta_weights():
    ours, _ = _pair(MIXED)
    ours.add_weighted_adapter(["one", "two"], [0.7, -0.5], "m", combination_type="magnitude_prune", density=0.3)

    def ref(ds, ws):
        return sum(w * _ties_ref([d], [1.0], 0.3) for d, w in zip(ds, ws))

    _close(_deltas_ours(ours, "m"), _reference(ours, ["one", "two"], [0.7, -0.5], ref))


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd"])
def test_dare_equals_the_pure_function_with_the_same_random_stream(kind):
    ours, _ = _pair(MIXED)
    torch.manual_seed(7)
    ours.add_weighted_adapter(["one", "two"], [0.7, 0.5], "d", combination_type=kind, density=0.5, svd_rank=64)
    torch.manual_seed(7)
    per = [_deltas_ours(ours, n) for n in ("one", "two")]
    expected = {p: M.combine([d[p] for d in per], [0.7, 0.5], kind, 0.5) for p, _ in ours.base_model.adapters("one")}
    _close(_deltas_ours(ours, "d"), expected)


# -- pure functions ---------------------------------------------------------------------------------------
def test_pure_functions_values():
    t = torch.tensor([[0.5, -3.0], [2.0, -0.1]])
    assert torch.equal(M.magnitude_mask(t, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-4.0, 1.0, 1.0])
    stacked = torch.stack([a, b])
    assert torch.equal(M.majority_sign_mask(stacked, "total"), torch.tensor([[False, True, True], [True, False, True]]))
    assert torch.equal(M.majority_sign_mask(stacked, "frequency"), torch.tensor([[True, False, True], [False, True, True]]))
    # total: signs (-, -, +); entry 0 keeps b only, entry 1 keeps a only, entry 2 averages both
    assert torch.equal(M.ties([a, b], [1.0, 2.0], 1.0), torch.tensor([-8.0, -2.0, 2.5]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 50)
    d = M.random_drop(x, 0.25, generator=g)
    kept = d != 0
    assert torch.equal(d[kept], x[kept] / 0.25) and abs(kept.float().mean().item() - 0.25) < 0.02
    A1, B1, A2, B2 = torch.randn(2, 5), torch.randn(4, 2), torch.randn(3, 5), torch.randn(4, 3)
    A, B = M.cat_factors([A1, A2], [B1, B2], [0.5, -2.0])
    torch.testing.assert_close(B @ A, 0.5 * B1 @ A1 - 2.0 * B2 @ A2)
    full = B1 @ A1 + B2 @ A2
    A, B = M.svd_factors(full, None)
    assert A.shape == (4, 5) and B.shape == (4, 4)
    torch.testing.assert_close(B @ A, full, atol=1e-5, rtol=1e-5)
    A, B = M.svd_factors(full, 2)
    s = torch.linalg.svdvals(full)
    assert math.isclose(torch.linalg.matrix_norm(full - B @ A).item(), s[2:].norm().item(), rel_tol=1e-4)


# -- errors -------------------------------------------------------------------------------------------
def test_errors_name_the_adapters():
    ours, _ = _pair({"one": {"r": 4}, "two": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    with pytest.raises(ValueError, match=r"'one' and 'two' target different modules: \['model\.layers\.0\.mlp\.down_proj'"):
        ours.add_weighted_adapter(["one", "two"], [1, 1], "x", combination_type="cat")
    ours.add_adapter("i", IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"LoRA adapters only; \{'i': 'IA3'\}"):
        ours.add_weighted_adapter(["one", "i"], [1, 1], "x")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        ours.add_weighted_adapter(["one", "zz"], [1, 1], "x")
    with pytest.raises(ValueError, match="'one' already exists"):
        ours.add_weighted_adapter(["one"], [1], "one")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        ours.add_weighted_adapter(["one", "two"], [1], "x")
    ours.add_adapter("c", LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="needs density"):
        ours.add_weighted_adapter(["one", "c"], [1, 1], "x", combination_type="ties")
    with pytest.raises(ValueError, match="combination_type"):
        ours.add_weighted_adapter(["one", "c"], [1, 1], "x", combination_type="nope")
    ours.add_adapter("d", LoraConfig(r=2, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match=r"DoRA adapters \['d'\]"):
        ours.add_weighted_adapter(["one", "d"], [1, 1], "x")
    assert "x" not in ours.peft_config


def test_svd_is_the_best_rank_k_approximation_across_ranks_rslora_patterns():
    ours, _ = _pair(MIXED)
    ours.add_weighted_adapter(["one", "two"], [0.7, -0.4], "s", combination_type="svd", svd_rank=3)
    expected = _reference(ours, ["one", "two"], [0.7, -0.4])
    got = _deltas_ours(ours, "s")
    for p, ref in expected.items():
        s = torch.linalg.svdvals(ref)
        err = torch.linalg.matrix_norm(ref - got[p]).item()
        assert math.isclose(err, s[3:].norm().item(), rel_tol=1e-3, abs_tol=1e-6), p
    assert not ours.peft_config["s"].use_rslora and all(a.r == 3 for _, a in ours.base_model.adapters("s"))


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_conv_and_embedding_layers(kind):
    """Conv2d (A (r, c_in, k, k), B (c_out, r, 1, 1)) and Embedding (A (r, vocab), B (dim, r)) layouts."""
    from .families import ConvNet

    for build, targets in ((ConvNet, ["conv1", "conv2", "head"]), (lambda: FAMILY["llama"].build(), ["embed_tokens"])):
        torch.manual_seed(0)
        model = get_peft_model(build(), LoraConfig(r=3, target_modules=targets, init_lora_weights=False),
                               adapter_name="one")
        model.add_adapter("two", LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=targets,
                                            init_lora_weights=False))
        with torch.no_grad():  # random B as well (embedding init leaves A zero)
            for _, a in model.base_model.adapters():
                a.lora_A.normal_()
                a.lora_B.normal_()
        model.add_weighted_adapter(["one", "two"], [0.5, 1.5], "m", combination_type=kind, svd_rank=5)
        _close(_deltas_ours(model, "m"), _reference(model, ["one", "two"], [0.5, 1.5]), atol=1e-4)


def test_grouped_conv_adapters_are_refused_by_name():
    import torch

    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="grouped convolutions cannot be merged: \\['0'\\]"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    assert "mix" not in model.peft_config
