"""Poly / MHR: config compatibility with Hugging Face PEFT, the routed math, task_ids per call (forward and
generate, checked before anything runs), files both ways and bad input."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.poly import PolyAdapter, PolyConfig
from peftkit.methods.poly.functional import mixed_factors, mixing_weights, poly_add, poly_delta

from ..families import FAMILY, V, untouched
from ..parity import assert_loads_both_ways, linearized, perturb, train_a_little
from ..parity import field_defaults

TASKS = torch.tensor([2, 0, 1])


def _ids(rows: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(1, V, (rows, length), generator=torch.Generator().manual_seed(11))


def _pair(family: str = "llama", seed: int = 5, **kw):
    """peft's and peftkit's models from the same seed (the same draws: the same initial adapters)."""
    kw.setdefault("task_type", "CAUSAL_LM")
    ref = linearized(FAMILY[family].model()) if family == "gpt2" else FAMILY[family].model()
    mine = FAMILY[family].model()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(ref, peft.PolyConfig(**kw)).eval()
    torch.manual_seed(seed)
    ours = peftkit.get_peft_model(mine, PolyConfig(**kw)).eval()
    return theirs, ours


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(PolyConfig) == field_defaults(peft.PolyConfig)
    peft.PolyConfig(r=3, n_tasks=5, n_skills=2, n_splits=4, target_modules=["q"]).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, PolyConfig)
    assert (loaded.r, loaded.n_tasks, loaded.n_skills, loaded.n_splits) == (3, 5, 2, 4)
    PolyConfig(r=2, n_tasks=7, init_weights=False).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.PolyConfig) and back.n_tasks == 7 and back.init_weights is False


@pytest.mark.parametrize("bad", [{"r": 0}, {"n_tasks": 0}, {"n_skills": 0}, {"n_splits": 0}, {"poly_type": "mhr"},
                                 {"init_weights": "yes"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PolyConfig(**bad)


def test_routed_math_against_the_direct_formula():
    torch.manual_seed(0)
    q, s, r, d_in, d_out = 2, 3, 4, 6, 8
    a, b = torch.randn(q, s, d_in // q, r), torch.randn(q, s, r, d_out // q)
    logits = torch.randn(2, q * s)
    w = mixing_weights(logits, q, s, training=False)
    z = torch.sigmoid(logits.view(2, q, s))
    torch.testing.assert_close(w, z / z.sum(-1, keepdim=True))
    x, out = torch.randn(2, 5, d_in), torch.randn(2, 5, d_out)
    a_rows, b_rows = mixed_factors(w, a, b)
    for i in range(2):  # split k of the input meets split k of A; split k of the output comes from split k of B
        A = torch.cat([sum(w[i, k, j] * a[k, j] for j in range(s)) for k in range(q)], dim=0)   # (d_in, r)
        B = torch.cat([sum(w[i, k, j] * b[k, j] for j in range(s)) for k in range(q)], dim=1)   # (r, d_out)
        torch.testing.assert_close(poly_delta(x, a_rows, b_rows, r)[i], x[i] @ A @ B / r)
    torch.testing.assert_close(poly_add(out, x, a_rows, b_rows, r), out + poly_delta(x, a_rows, b_rows, r))
    one = mixed_factors(w[:1], a, b)  # one row of factors shared by every row of x
    torch.testing.assert_close(poly_add(out, x, *one, r), out + x @ one[0][0] @ one[1][0] / r)
    wt = mixing_weights(logits, q, s, training=True)  # a relaxed-Bernoulli sample, normalised per split
    torch.testing.assert_close(wt.sum(-1), torch.ones(2, q))


@pytest.mark.parametrize("kw", [{"r": 2, "n_tasks": 3, "n_skills": 3, "n_splits": 2, "init_weights": False},
                                {"r": 4, "n_tasks": 3, "n_skills": 2}])
def test_same_init_outputs_and_gradients_as_peft(kw):
    theirs, ours = _pair(**kw)
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert ref.keys() == mine.keys() and any(k.endswith(".poly_router.module_logits") for k in ref)
    assert all(torch.equal(ref[k], mine[k]) for k in ref)  # the same draws, in the same order
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = _ids()
    with torch.no_grad():
        base = FAMILY["llama"].model()(ids).logits
        expected = theirs(ids, task_ids=TASKS).logits
        torch.testing.assert_close(ours(ids, task_ids=TASKS).logits, expected, atol=1e-5, rtol=0)
    if kw.get("init_weights", True):
        torch.testing.assert_close(expected, base)  # B starts at zero: the base model
    else:
        assert (expected - base).abs().max() > 1e-3
    theirs.train(), ours.train()  # training samples the routing: the same draws from the same seed
    grads = []
    for model in (theirs, ours):
        torch.manual_seed(9)
        model(ids, task_ids=TASKS).logits.pow(2).mean().backward()
        grads.append({n.replace(".adapters.default", "").replace(".default", "").replace("poly_router.", ""): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][key], atol=1e-5, rtol=1e-4, msg=key)


def _train(model, family) -> None:
    """A few SGD steps (B starts at 0 and the router near uniform), then a push of every trained tensor."""
    train_a_little(model, family)
    perturb(model)


def _with_tasks(name: str, tasks: list[int]):
    fam = FAMILY[name]
    return dataclasses.replace(fam, inputs=lambda: {**fam.inputs(), "task_ids": torch.tensor(tasks)})


@pytest.mark.parametrize(("family", "kw"), [("llama", {"n_tasks": 3, "n_splits": 2}), ("gpt2", {"n_tasks": 2}),
                                            ("bert", {"n_tasks": 4, "n_skills": 2})])
def test_files_load_both_ways_with_task_ids(family, kw, tmp_path):
    fam = _with_tasks(family, [kw["n_tasks"] - 1, 0])
    task = {"task_type": fam.task_type or "CAUSAL_LM"}
    ref_cfg, our_cfg = peft.PolyConfig(r=2, **kw, **task), PolyConfig(r=2, **kw, **task)
    ref_model = (lambda: linearized(fam.model())) if family == "gpt2" else fam.model
    assert_loads_both_ways(fam, ref_cfg, our_cfg, tmp_path, train=_train, reference_model=ref_model)


def _generate(model, ids, mask, tasks, use_cache, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, max_new_tokens=4, do_sample=False,
                          use_cache=use_cache, pad_token_id=0, **kw)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_with_task_ids_equals_peft(use_cache):
    theirs, ours = _pair(r=2, n_tasks=3, n_skills=2, n_splits=2, init_weights=False)
    perturb(ours, scale=2.0)  # routers apart: each task its own mix of skills; peft gets the same tensors
    peft.set_peft_model_state_dict(theirs, {k: v.detach().clone() for k, v in
                                            peftkit.get_peft_model_state_dict(ours).items()})
    ids = _ids(3, 5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    expected = _generate(theirs, ids, mask, TASKS, use_cache)
    got = _generate(ours, ids, mask, TASKS, use_cache)
    assert torch.equal(got, expected)
    assert not torch.equal(_generate(ours, ids, mask, torch.tensor([0, 0, 0]), use_cache), got)  # the task matters
    with ours.disable_adapter():  # disabled: the base model's tokens, task_ids or not
        base = _generate(ours, ids, mask, None, use_cache)
    plain = FAMILY["llama"].model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                             use_cache=use_cache, pad_token_id=0)
    assert torch.equal(base, plain)


def test_beam_search_repeats_each_rows_task():
    """Generation that expands the batch (num_beams) routes each beam by its row's task (peft fails on shapes)."""
    _, ours = _pair(r=2, n_tasks=3, n_skills=2, init_weights=False)
    perturb(ours, scale=2.0)
    ids = _ids(3, 5)
    together = _generate(ours, ids, None, TASKS, True, num_beams=2)
    alone = [_generate(ours, ids[i:i + 1], None, TASKS[i:i + 1], True, num_beams=2) for i in range(3)]
    assert torch.equal(together, torch.cat(alone))


@pytest.mark.parametrize(("tasks", "match"), [
    (None, r"task_ids: required .*n_tasks=3.*\[0, 3\)"), (torch.tensor([0, 3, 1]), r"task_ids.*\[0, 3\)"),
    (torch.tensor([0, -1, 1]), r"task_ids.*\[0, 3\)"), (torch.tensor([0, 1]), r"task_ids.*2 ids for 3 rows"),
    (torch.tensor([0.0, 1.0, 1.0]), r"task_ids.*\[0, 3\)"), (torch.tensor([[0, 1, 2]]), r"task_ids.*\[0, 3\)"),
])
def test_bad_task_ids_fail_before_any_computation(tasks, match):
    _, ours = _pair(r=2, n_tasks=3)
    ran = []
    handle = ours.get_base_model().register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=match):
        ours(_ids(), task_ids=tasks)
    with pytest.raises(ValueError, match=match):
        ours.generate(input_ids=_ids(), task_ids=tasks, max_new_tokens=2)
    handle.remove()
    assert not ran


def test_single_task_needs_no_task_ids():
    """n_tasks=1 (peft's default): task_ids may be left out, every row is task 0 (peft raises)."""
    _, ours = _pair(r=2, n_skills=3, init_weights=False)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ours(ids, task_ids=torch.zeros(3, dtype=torch.long)).logits)


def test_mhr_split_must_divide_features_model_untouched():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5))
    with untouched(model), pytest.raises(ValueError, match=r"PolyConfig.n_splits: 1 has 6 input and 5 output.*n_splits=2"):
        peftkit.get_peft_model(model, PolyConfig(r=2, n_splits=2, target_modules=["0", "1"]))


def test_unsupported_layer_is_refused_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with untouched(model), pytest.raises((TypeError, ValueError)):
        peftkit.get_peft_model(model, PolyConfig(r=2, target_modules=["0", "1"]))


def test_param_count_closed_form():
    base = nn.Linear(12, 8)
    cfg = PolyConfig(r=3, n_tasks=5, n_skills=4, n_splits=2)
    adapter = PolyAdapter(base, cfg)
    assert sum(p.numel() for p in adapter.parameters()) == PolyAdapter.param_count(base, cfg) == 4 * 3 * 20 + 5 * 8
