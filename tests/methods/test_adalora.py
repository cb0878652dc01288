"""AdaLoRA: config validation, the rank allocator and orthogonality penalty, and parity with Hugging Face PEFT
(same initial weights, same masks step by step, same regularised loss, adapter files that load both ways
after training and pruning)."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.adalora import AdaLoraAdapter, AdaLoraConfig, RankAllocator, budget_schedule, orthogonality_penalty

from ..families import FAMILY
from ..parity import adalora_train_perturbed, paired_configs

# a short schedule: warm-up to step 1, budget phase to step 4 (final mask), then 2 steps at the final ranks
SCHEDULE = {"init_r": 4, "target_r": 2, "lora_alpha": 8, "tinit": 1, "tfinal": 2, "total_step": 6, "deltaT": 1}


def configs(name: str, **kwargs):
    return paired_configs(FAMILY[name], peft.AdaLoraConfig, AdaLoraConfig, **{**SCHEDULE, **kwargs})


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """One causal-LM step with labels (so the forward adds the orthogonality penalty to the loss)."""
    torch.manual_seed(100 + step)
    ids = torch.randint(0, 99, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    model.update_and_allocate(step)
    opt.zero_grad()
    return loss.item()


def plain(pattern: dict | None) -> dict | None:
    """PEFT keeps ``.<adapter name>`` in its in-memory rank_pattern keys until it saves."""
    return None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}


# -- config ---------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours = {f.name for f in dataclasses.fields(AdaLoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.AdaLoraConfig)}
    assert ours == theirs  # runtime_config included (LoraConfig's; never saved, in either library)
    a, b = AdaLoraConfig(total_step=10), peft.AdaLoraConfig(total_step=10)
    for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                 "total_step", "rank_pattern", "lora_alpha", "lora_dropout", "init_lora_weights", "r"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.peft_type == "ADALORA" and str(b.peft_type.value) == "ADALORA"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"total_step": None}, "total_step"), ({"total_step": 0}, "total_step"), ({"total_step": -3}, "total_step"),
     ({"target_r": 13}, "target_r"), ({"target_r": 0}, "target_r"), ({"init_r": 0}, "init_r"),
     ({"tinit": 5, "tfinal": 5}, r"tinit \+ tfinal"), ({"tinit": 10}, r"tinit \+ tfinal"),
     ({"tinit": -1}, "tinit"), ({"tfinal": -1}, "tfinal"), ({"deltaT": 0}, "deltaT"),
     ({"beta1": 1.0}, "beta1"), ({"beta1": -0.1}, "beta1"), ({"beta2": 1.5}, "beta2"),
     ({"orth_reg_weight": -0.5}, "orth_reg_weight"), ({"use_dora": True}, "use_dora"),
     ({"use_rslora": True}, "use_rslora"), ({"init_lora_weights": "gaussian"}, "init_lora_weights"),
     ({"rank_pattern": {"q.lora_E": [1, 0]}}, "rank_pattern"), ({"rank_pattern": ["q"]}, "rank_pattern"),
     ({"lora_dropout": 1.0}, "lora_dropout")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"AdaLoraConfig\.{field}"):
        AdaLoraConfig(**{"total_step": 10, **kwargs})


def test_config_accepts_the_edges_and_warns_that_r_is_unused():
    AdaLoraConfig(total_step=3, tinit=1, tfinal=1, target_r=12, beta1=0.0, beta2=0.0, orth_reg_weight=0.0)
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(total_step=10, r=4)


def test_config_json_round_trip_and_peft_reads_it(tmp_path):
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False]}
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=3, tfinal=4, deltaT=5, beta1=0.8, beta2=0.7, total_step=50,
                        orth_reg_weight=0.1, rank_pattern=pattern, target_modules=["q_proj"])
    cfg.save_pretrained(tmp_path)
    back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, AdaLoraConfig) and back.to_dict() == cfg.to_dict()
    ref = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ref, peft.AdaLoraConfig)
    assert (ref.init_r, ref.target_r, ref.tinit, ref.tfinal, ref.deltaT, ref.total_step) == (4, 2, 3, 4, 5, 50)
    assert ref.rank_pattern == pattern


# -- pure functions -------------------------------------------------------------------------------------
def test_budget_schedule_is_peft_s_cubic_schedule():
    cfg = peft.AdaLoraConfig(init_r=12, target_r=4, tinit=5, tfinal=7, deltaT=3, total_step=40)
    ref = PeftRankAllocator.__new__(PeftRankAllocator)
    ref.peft_config, ref.init_bgt, ref.target_bgt = cfg, 12 * 6, 4 * 6
    budgets = []
    for step in range(45):
        ours = budget_schedule(step, init_bgt=72, target_bgt=24, tinit=5, tfinal=7, total_step=40, deltaT=3)
        assert ours == ref.budget_schedule(step), step
        budgets.append(ours[0])
    assert budgets[:6] == [72] * 6 and budgets[33:] == [24] * 12  # warm-up, then final budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never grows
    # eq. (12) in the middle of the budget phase: 24 + 48 (1 - 14 / 28)^3 = 30
    assert budget_schedule(19, init_bgt=72, target_bgt=24, tinit=5, tfinal=7, total_step=40, deltaT=3) == (30, False)


def test_orthogonality_penalty_is_the_mean_frobenius_distance_to_identity():
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    A2, B2 = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    expected = sum(
        torch.sqrt(((m - torch.eye(m.shape[0], dtype=torch.float64)) ** 2).sum())
        for m in (A1 @ A1.T, B1.T @ B1, A2 @ A2.T, B2.T @ B2)
    ) / 4
    torch.testing.assert_close(orthogonality_penalty([(A1, B1), (A2, B2)]), expected)
    # orthonormal Q rows and P columns: no penalty
    Q = torch.linalg.qr(torch.randn(7, 3, generator=g, dtype=torch.float64))[0]
    assert orthogonality_penalty([(Q.T, Q)]).item() == pytest.approx(0, abs=1e-12)
    assert orthogonality_penalty([]) is None


def test_mask_to_budget_drops_the_lowest_triplet_scores():
    class T:
        def __init__(self, r):
            self.lora_A, self.lora_E, self.lora_B = torch.ones(r, 3), torch.ones(r, 1), torch.ones(2, r)

    triplets = {"a": T(3), "b": T(3)}
    alloc = RankAllocator(AdaLoraConfig(init_r=3, target_r=2, total_step=10), {"a": 3, "b": 3})
    # importance s = Ibar * Ubar; make triplet scores a: [6, 1, 5], b: [3, 2, 4] through lambda's entry alone
    for path, scores in (("a", [6.0, 1.0, 5.0]), ("b", [3.0, 2.0, 4.0])):
        for name, shape in (("lora_A", (3, 3)), ("lora_B", (2, 3)), ("lora_E", (3, 1))):
            alloc.exp_avg_ipt[(path, name)] = torch.ones(shape)
            alloc.exp_avg_unc[(path, name)] = torch.zeros(shape)
        alloc.exp_avg_unc[(path, "lora_E")] = torch.tensor(scores).view(3, 1)
    masks = alloc.mask_to_budget(triplets, budget=4)  # 6 -> 4: drop scores 1 and 2
    assert masks == {"a": [True, False, True], "b": [True, False, True]}
    assert triplets["a"].lora_E.view(-1).tolist() == [1, 0, 1] and triplets["b"].lora_E.view(-1).tolist() == [1, 0, 1]
    assert alloc.mask_to_budget(triplets, budget=6) == {"a": [True] * 3, "b": [True] * 3}  # nothing to prune


# -- adapter ----------------------------------------------------------------------------------------------
def test_delta_is_scaled_svd_form_and_forward_matches_merge():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    a = AdaLoraAdapter(base, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, total_step=10, init_lora_weights=False))
    expected = a.lora_B @ torch.diag(a.lora_E.view(-1)) @ a.lora_A * 6 / (3 + 1e-5)
    torch.testing.assert_close(a.delta_weight(base), expected)
    x = torch.randn(4, 6)
    torch.testing.assert_close(a(base, x, base(x)), x @ (base.weight + expected).T + base.bias)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    c = AdaLoraAdapter(conv, AdaLoraConfig(init_r=2, total_step=10, target_r=1, init_lora_weights=False))
    assert c.lora_A.shape == (2, 27) and c.lora_B.shape == (4, 2)
    img = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(c(conv, img, conv(img)),
                               nn.functional.conv2d(img, conv.weight + c.delta_weight(conv), conv.bias, padding=1))


@pytest.mark.parametrize("conv1d", [False, True])  # True: GPT-2's Conv1D (weight stored (d_in, d_out))
def test_fused_forward_is_the_svd_formula_and_its_gradients(conv1d):
    """The one-pass path (LoRA's kernel on ``Q diag(lambda)``) against the composed formula, in float64:
    the same output and the same gradients for P, lambda, Q and the input."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 6) if conv1d else nn.Linear(6, 5)
    nn.init.normal_(base.bias)
    base = base.double().requires_grad_(False)
    a = AdaLoraAdapter(base, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, total_step=10,
                                           init_lora_weights=False)).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = base.weight.T if conv1d else base.weight
    runs = {}
    for path in ("fused", "formula"):
        for t in (x, a.lora_A, a.lora_E, a.lora_B):
            t.grad = None
        if path == "fused":
            out = a.fused_forward(base, x)
        else:  # eq. 3 with PEFT's scale, written out
            delta = a.lora_B @ (a.lora_A * a.lora_E) * 6 / (3 + 1e-5)
            out = x @ (weight + delta).T + base.bias
        out.pow(2).sum().backward()
        runs[path] = [out.detach()] + [t.grad.clone() for t in (x, a.lora_A, a.lora_E, a.lora_B)]
    for fused, formula in zip(runs["fused"], runs["formula"]):
        torch.testing.assert_close(fused, formula, atol=1e-12, rtol=1e-10)
    # the generic path (a base output given) agrees too
    torch.testing.assert_close(a(base, x, base(x)), runs["formula"][0], atol=1e-12, rtol=1e-10)


def test_training_step_allocates_no_activation_sized_temporaries():
    """Forward + backward of an adapted Linear creates one (tokens x d_out) tensor, the output, as LoRA
    does: no product, scaled and divided copies of the update, no separate base output."""
    from .test_lora_functional import _full_size_outputs

    torch.manual_seed(0)
    n, d_in, d_out = 64, 12, 20
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)),
                                   AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["0"])).train()
    x, g = torch.randn(n, d_in, requires_grad=True), torch.randn(n, d_out)
    assert _full_size_outputs(lambda: model(x).backward(g), (n, d_out)) == 1


def test_importance_averages_update_in_place_with_peft_s_arithmetic():
    """The sensitivity / uncertainty averages keep their tensors from step to step (no per-step
    allocations) and hold exactly PEFT's out-of-place expressions (same operations, same roundings)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    a = AdaLoraAdapter(base, AdaLoraConfig(init_r=3, target_r=2, total_step=10, init_lora_weights=False))
    alloc = RankAllocator(AdaLoraConfig(init_r=3, target_r=2, total_step=10), {"m": 3})
    b1, b2 = alloc.beta1, alloc.beta2
    ipt_avg, unc_avg, ptrs = {}, {}, None
    for step in range(3):
        for name in ("lora_A", "lora_E", "lora_B"):
            getattr(a, name).grad = torch.randn(getattr(a, name).shape)
        alloc.update_ipt({"m": a})
        for name in ("lora_A", "lora_E", "lora_B"):  # PEFT's RankAllocator.update_ipt, written out
            p = getattr(a, name)
            ipt = (p * p.grad).abs().detach()
            ipt_avg[name] = b1 * ipt_avg.get(name, torch.zeros_like(p)) + (1 - b1) * ipt
            unc_avg[name] = b2 * unc_avg.get(name, torch.zeros_like(p)) + (1 - b2) * (ipt - ipt_avg[name]).abs()
            assert torch.equal(alloc.exp_avg_ipt[("m", name)], ipt_avg[name]), (step, name)
            assert torch.equal(alloc.exp_avg_unc[("m", name)], unc_avg[name]), (step, name)
        now = [t.data_ptr() for d in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc) for t in d.values()]
        assert ptrs is None or now == ptrs
        ptrs = now


def test_unsupported_layers_are_declared():
    assert not issubclass(nn.Embedding, AdaLoraAdapter.supported_layers)
    with pytest.raises(ValueError, match="grouped"):
        AdaLoraAdapter(nn.Conv2d(4, 4, 3, groups=2), AdaLoraConfig(total_step=10))


# -- compatibility with Hugging Face PEFT ------------------------------------------------------------------


def _lm_pair(**kwargs):
    family = FAMILY["llama"]
    kw = {**SCHEDULE, "total_step": 10, "tinit": 2, "tfinal": 2, "deltaT": 2, "task_type": "CAUSAL_LM", **kwargs}
    theirs = peft.get_peft_model(family.model(), peft.AdaLoraConfig(**kw))
    ours = peftkit.get_peft_model(family.model(), AdaLoraConfig(**kw))
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (theirs, ours)]
    theirs.train(), ours.train()
    return theirs, ours, opts


def test_allocator_masks_and_regularised_loss_match_peft_step_by_step():
    theirs, ours, (opt_t, opt_o) = _lm_pair()
    patterns = []
    for step in range(12):
        loss_t, loss_o = lm_step(theirs, opt_t, step), lm_step(ours, opt_o, step)
        assert loss_o == pytest.approx(loss_t, abs=1e-5), step
        pattern = ours.peft_config["default"].rank_pattern
        assert pattern == plain(theirs.peft_config["default"].rank_pattern), step
        patterns.append(pattern)
        if step < 8:  # the importance averages too (PEFT resets them at the final mask)
            ref_alloc, our_alloc = theirs.base_model.rankallocator, ours.base_model.hook_state["default"]
            for (path, name), value in our_alloc.exp_avg_unc.items():
                ref_key = f"{path}.{name}.default"
                torch.testing.assert_close(value, ref_alloc.exp_avg_unc[ref_key], atol=1e-7, rtol=1e-5)
    assert patterns[3] is None and patterns[4] is not None  # first mask at step 4 (tinit 2, deltaT 2)
    final = patterns[8]
    assert sum(map(sum, final.values())) == 2 * len(final)  # target budget: target_r per matrix
    assert len({sum(m) for m in final.values()}) > 1  # and spread unevenly: that is the point
    ref_E, our_E = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert ref_E.keys() == our_E.keys()
    for key in ref_E:
        torch.testing.assert_close(our_E[key], ref_E[key], atol=1e-6, rtol=0)
    # after the final mask, masked singular values stay zero although the optimizer moves them
    for path, adapter in ours.base_model.adapters("default"):
        mask = torch.tensor(final[f"{path}.lora_E"])
        assert torch.all(adapter.lora_E.view(-1)[~mask] == 0)


def test_orthogonality_penalty_is_added_to_the_loss_like_peft():
    theirs, ours, _ = _lm_pair(init_lora_weights=False)
    ids = torch.randint(0, 99, (2, 7))
    loss_t, loss_o = theirs(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_o, loss_t, atol=1e-5, rtol=0)
    layers = [a for _, a in ours.base_model.adapters("default")]
    penalty = orthogonality_penalty([(a.lora_A, a.lora_B) for a in layers])
    plain_loss = ours.get_base_model()(input_ids=ids, labels=ids).loss  # the user's model alone: no penalty
    torch.testing.assert_close(loss_o, plain_loss + 0.5 * penalty, atol=1e-6, rtol=0)
    assert penalty.item() > 1  # random P, Q are far from orthonormal
    # no labels, no loss: nothing added; a frozen (inference-mode) adapter adds nothing either
    assert ours(input_ids=ids).loss is None
    ours.set_adapter("default", inference_mode=True)
    torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, plain_loss, atol=0, rtol=0)


def test_update_and_allocate_needs_gradients():
    _, ours, _ = _lm_pair()
    with pytest.raises(RuntimeError, match="after loss.backward"):
        ours.update_and_allocate(0)


def test_loading_a_peft_state_dict_into_a_masked_live_adapter_resizes_it():
    theirs, ours, (opt_t, opt_o) = _lm_pair()
    for step in range(10):
        lm_step(theirs, opt_t, step), lm_step(ours, opt_o, step)
    theirs.eval(), ours.eval()
    ids = torch.randint(0, 99, (2, 7))
    expected = theirs(input_ids=ids).logits
    with torch.no_grad():  # make the loaded values differ from ours
        for p in ours.parameters():
            if p.requires_grad:
                p.mul_(3)
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    ranks = [a.r for _, a in ours.base_model.adapters("default")]
    assert sum(ranks) == 2 * len(ranks)
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_a_peft_adapter_with_a_fully_pruned_matrix_loads(tmp_path):
    family = FAMILY["llama"]
    ref_cfg, _ = configs("llama", target_r=1)
    theirs = peft.get_peft_model(family.model(), ref_cfg)
    adalora_train_perturbed(theirs, family)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    ranks = {p: a.r for p, a in ours.base_model.adapters("default")}
    assert sum(ranks.values()) == len(ranks) and 0 in ranks.values()  # a query projection lost every rank
    torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rank_pattern keys name targeted modules: no "unused" warning
        peftkit.PeftModel.from_pretrained(family.model(), tmp_path)


def test_the_penalty_is_added_without_a_task_type_too():
    """peft's plain PeftModel (no task_type) calls the base model directly and so skips AdaLoRA's penalty;
    peftkit adds it whenever the forward computes a loss."""
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), AdaLoraConfig(**SCHEDULE))
    assert type(model) is peftkit.PeftModel
    ids = torch.randint(0, 99, (2, 7))
    penalty = orthogonality_penalty([(a.lora_A, a.lora_B) for _, a in model.base_model.adapters("default")])
    expected = model.get_base_model()(input_ids=ids, labels=ids).loss + 0.5 * penalty
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, expected, atol=1e-6, rtol=0)
