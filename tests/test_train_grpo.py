"""`peftkit train` with `task: grpo`: the clipped objective with its k3 KL term against the formula in plain
floats, group-normalised advantages, the rule-based rewards, seeded sampling, completion-only log-probs, the
reference as the same model with its adapter disabled, a short run on the tiny recipe, and recipe errors
named by their YAML path."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import transformers

from peftkit import LoraConfig, get_peft_model
from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.grpo import (
    ADV_EPS, RewardSpec, exact_reward, group_advantages, grpo_loss, reference_token_logps, regex_reward, reward,
    token_logps,
)
from peftkit.train.preference_task import llama_tiny
from peftkit.train.tasks import TASKS

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "agnews_grpo_tiny.yaml")

# two prompts, a group of 3 completions each: rewards, per-token log-probs of the policy, of the sampling
# policy and of the reference, and how many tokens each completion has (the rest is padding)
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5]
PI = [[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0], [-2.0, 0.0, 0.0], [-0.7, -0.9, -1.1], [-1.5, -0.2, 0.0],
      [-0.4, 0.0, 0.0]]
OLD = [[-1.1, -1.6, -0.5], [-0.6, -1.2, 0.0], [-1.7, 0.0, 0.0], [-0.7, -1.3, -0.8], [-1.5, -0.1, 0.0],
       [-0.9, 0.0, 0.0]]
REF = [[-1.3, -1.8, -0.2], [-0.2, -1.0, 0.0], [-2.4, 0.0, 0.0], [-0.5, -0.9, -1.6], [-1.0, -0.6, 0.0],
       [-0.4, 0.0, 0.0]]
LENGTHS = [3, 2, 1, 3, 2, 1]


def _advantages_by_hand() -> list[float]:
    out = []
    for g in (REWARDS[:3], REWARDS[3:]):
        mean, std = statistics.fmean(g), statistics.stdev(g)  # Bessel's correction, as torch.std
        out += [(r - mean) / (std + ADV_EPS) for r in g]
    return out


def _loss_by_hand(eps: float, beta: float) -> tuple[float, float]:
    adv, per_row, kls = _advantages_by_hand(), [], []
    for i in range(6):
        terms = []
        for t in range(LENGTHS[i]):
            rho = math.exp(PI[i][t] - OLD[i][t])
            surrogate = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            d = REF[i][t] - PI[i][t]
            kl = math.exp(d) - d - 1
            kls.append(kl)
            terms.append(-(surrogate - beta * kl))
        per_row.append(sum(terms) / LENGTHS[i])
    return sum(per_row) / 6, sum(kls) / len(kls)


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


def test_advantages_are_normalised_within_each_group():
    adv = group_advantages(_t(REWARDS), 3)
    torch.testing.assert_close(adv, _t(_advantages_by_hand()), rtol=0, atol=1e-12)
    assert torch.equal(group_advantages(_t([0.0, 0.0, 1.0, 1.0]), 2), _t([0.0, 0.0, 0.0, 0.0]))  # no signal


@pytest.mark.parametrize("eps, beta", [(0.2, 0.04), (0.1, 0.5), (0.2, 0.0)])
def test_loss_is_its_formula(eps, beta):
    mask = torch.tensor([[t < n for t in range(3)] for n in LENGTHS])
    pi = _t(PI).requires_grad_()
    adv = group_advantages(_t(REWARDS), 3)
    out = grpo_loss(pi, _t(OLD), _t(REF), mask, adv, eps, beta)
    loss, kl = _loss_by_hand(eps, beta)
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert out.kl.item() == pytest.approx(kl if beta else 0.0, abs=1e-12)
    ratios = [math.exp(PI[i][t] - OLD[i][t]) for i in range(6) for t in range(LENGTHS[i])]
    assert out.clipped.item() == pytest.approx(sum(abs(r - 1) > eps for r in ratios) / len(ratios))
    out.loss.backward()
    assert (pi.grad[~mask] == 0).all() and (pi.grad[mask] != 0).any()  # padding positions do not count


def test_one_update_per_batch_has_ratio_one_and_a_zero_kl_at_the_reference():
    mask = torch.tensor([[t < n for t in range(3)] for n in LENGTHS])
    adv = group_advantages(_t(REWARDS), 3)
    pi = _t(PI).requires_grad_()
    out = grpo_loss(pi, pi.detach(), pi.detach(), mask, adv, 0.2, 0.04)
    assert out.loss.item() == pytest.approx(float(-adv.mean()), abs=1e-12) and out.kl.item() == 0.0
    out.loss.backward()  # d/d logp of -A * exp(logp - old) at ratio 1: -A / (|o| * rows); the KL adds 0
    expected = -adv[:, None] / torch.tensor(LENGTHS, dtype=torch.float64)[:, None] / 6 * mask
    torch.testing.assert_close(pi.grad, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(pi, pi.detach(), None, mask, adv, 0.2, 0.04)


def test_rewards_on_examples():
    assert exact_reward("Sports", "Sports") == 1.0
    assert exact_reward("  Sports fans cheered", "Sports") == 1.0  # the first word
    assert exact_reward("Sports fans", "Sports", whole=True) == 0.0
    assert exact_reward("sports", "Sports") == 0.0 and exact_reward("sports", "Sports", ignore_case=True) == 1.0
    assert exact_reward("The Sports", "Sports") == 0.0 and exact_reward("", "Sports") == 0.0
    assert exact_reward("Sports.", "Sports") == 0.0  # exact: punctuation is part of the word
    assert exact_reward("sci / tech and more", "sci / tech") == 1.0  # a label of k words: the first k
    assert exact_reward("sci / space", "sci / tech") == 0.0
    assert regex_reward("It is Sci/Tech.", "Sci/Tech", r"\b{label}\b") == 1.0
    assert regex_reward("It is SciXTech.", "Sci.Tech", "{label}") == 0.0  # the label is escaped
    assert regex_reward("SPORTS!", "Sports", r"^{label}", ignore_case=True) == 1.0
    assert regex_reward("answer: 42", "x", r"\d+$") == 1.0 and regex_reward("answer", "x", r"\d+$") == 0.0
    assert reward(RewardSpec(type="regex", pattern="^{label}"), "World news", "World") == 1.0
    assert reward(RewardSpec(type="exact", whole=True), "World news", "World") == 0.0


def _task(tmp_path, *overrides):
    recipe = load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    task = TASKS["grpo"](recipe)
    task.load_data()
    return task


def _perturbed_policy(task):
    model = get_peft_model(task.load_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_sampling_is_seeded_and_logps_cover_the_completion_only(tmp_path):
    task = _task(tmp_path)
    model = _perturbed_policy(task)
    batch = task.batch([0, 1, 2])
    assert batch == task.batch([0, 1, 2]) and batch["seed"] != task.batch([0, 1, 3])["seed"]
    a = task.generate(model, batch["prompt_ids"], sample=True, seed=batch["seed"])
    assert a == task.generate(model, batch["prompt_ids"], sample=True, seed=batch["seed"])
    assert a != task.generate(model, batch["prompt_ids"], sample=True, seed=batch["seed"] + 1)
    assert len(a) == 3 * 4 and all(len(c) == 4 for c in a)  # G per prompt; MiniLM has no EOS: full length
    assert len(set(map(tuple, a[:4]))) > 1  # sampled, not greedy
    prompts = [p for p in batch["prompt_ids"] for _ in range(4)]
    rows = task.encode(prompts, a)
    with torch.no_grad():
        logps, mask = token_logps(model, rows)
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    full = torch.log_softmax(logits[:, :-1].float(), -1)
    for i, (p, c) in enumerate(zip(prompts, a)):
        assert rows["input_ids"][i, : len(p) + len(c)].tolist() == p + c
        assert mask[i].nonzero()[:, 0].tolist() == list(range(len(p) - 1, len(p) - 1 + len(c)))
        for j, tok in enumerate(c):
            assert abs(float(logps[i, len(p) - 1 + j]) - float(full[i, len(p) - 1 + j, tok])) < 1e-5
    assert (logps[~mask] == 0).all()


def test_reference_is_the_base_model_through_disable_adapter(tmp_path, monkeypatch):
    task = _task(tmp_path)
    built = []
    real_init = transformers.LlamaForCausalLM.__init__
    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__",
                        lambda self, *a, **k: (built.append(1), real_init(self, *a, **k))[1])
    model = _perturbed_policy(task)
    assert len(built) == 1
    calls = []
    real_disable = type(model).disable_adapter
    monkeypatch.setattr(type(model), "disable_adapter", lambda self: (calls.append(1), real_disable(self))[1])
    n_params = sum(p.numel() for p in model.parameters())
    loss = task.loss(model, task.batch([3, 4]))  # sampling, the policy forward, then the reference forward
    assert len(calls) == 1 and len(built) == 1  # the reference came from disable_adapter, no model was built
    assert sum(p.numel() for p in model.parameters()) == n_params and loss.requires_grad
    batch = task.batch([3, 4])
    completions = task.generate(model, batch["prompt_ids"], sample=True, seed=batch["seed"])
    rows = task.encode([p for p in batch["prompt_ids"] for _ in range(4)], completions)
    with torch.no_grad():
        ref = reference_token_logps(model, rows)
        policy, mask = token_logps(model, rows)
    _, base = llama_tiny()  # a separate copy of the base weights, built here only to compare
    with torch.no_grad():
        base_logps = token_logps(base.eval(), rows)[0]
    torch.testing.assert_close(ref, base_logps, rtol=0, atol=1e-5)
    assert (policy - ref)[mask].abs().max() > 1e-2  # the adapter does change the policy
    # the task's loss on these completions: rewards all 0 here (a random model), so only beta * KL remains
    d = ref - policy
    kl = ((torch.exp(d) - d - 1) * mask).sum(1) / mask.sum(1)
    assert float(task.rewards(completions, [y for y in batch["labels_text"] for _ in range(4)]).sum()) == 0
    torch.testing.assert_close(loss, 0.04 * kl.mean(), rtol=0, atol=1e-6)


def test_one_step_raises_the_log_probs_of_the_advantaged_completions(tmp_path):
    """A reward the random model earns about half the time (a completion starting with a letter a..m):
    after one step, the advantage-weighted completion log-probability of the same rows has gone up."""
    task = _task(tmp_path, "grpo.reward.type=regex", "grpo.reward.pattern=^[a-m]", "grpo.beta=0")
    model = _perturbed_policy(task)
    batch = task.batch(list(range(8)))
    completions = task.generate(model, batch["prompt_ids"], sample=True, seed=batch["seed"])
    adv = group_advantages(task.rewards(completions, [y for y in batch["labels_text"] for _ in range(4)]), 4)
    assert (adv != 0).sum() >= 8
    rows = task.encode([p for p in batch["prompt_ids"] for _ in range(4)], completions)

    def objective() -> float:
        with torch.no_grad():
            logps, mask = token_logps(model, rows)
        return float((adv * logps.sum(1) / mask.sum(1)).mean())

    before = objective()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    task.loss(model, batch).backward()
    opt.step()
    assert objective() > before + 1e-4


def test_grpo_run_reports_rewards_before_and_after(tmp_path):
    summary = train(load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                       "data.test_rows=8"]), quiet=True)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["main_metric"] == "mean_reward" and on_disk["eval_decoding"] == "greedy"
    for key in ("mean_reward", "accuracy"):
        assert 0.0 <= on_disk[key] <= 1.0 and 0.0 <= on_disk[f"before_{key}"] <= 1.0
    assert on_disk["num_generations"] == 4 and on_disk["steps"] == 2
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and math.isfinite(m["loss"]) for m in losses)


@pytest.mark.parametrize("overrides, message", [
    (["grpo.num_generations=1"], "grpo.num_generations: expected an integer >= 2"),
    (["grpo.max_new_tokens=0"], "grpo.max_new_tokens: expected a positive integer"),
    (["grpo.max_new_tokens=96"], "grpo.max_new_tokens: expected an integer below data.max_length (96)"),
    (["grpo.temperature=0"], "grpo.temperature: expected a positive number"),
    (["grpo.epsilon=1.5"], "grpo.epsilon: expected a number in (0, 1)"),
    (["grpo.beta=-0.1"], "grpo.beta: expected a number >= 0"),
    (["grpo.beta=.nan"], "grpo.beta: expected a finite number"),
    (["grpo.beta=much"], "grpo.beta: expected a number, got 'much'"),
    (["grpo.typo=1"], "grpo.typo: unknown key"),
    (["grpo.reward.type=fuzzy"], "grpo.reward.type: expected one of exact, regex, got 'fuzzy'"),
    (["grpo.reward.kind=exact"], "grpo.reward.kind: unknown key"),
    (["grpo.reward.type=regex"], "grpo.reward.pattern: reward type regex needs a pattern"),
    (["grpo.reward.type=regex", "grpo.reward.pattern=(unclosed"], "grpo.reward.pattern: not a regular expression"),
    (["grpo.reward.pattern=x"], "grpo.reward.pattern: only reward type regex reads it"),
    (["grpo.reward.ignore_case=yes please"], "grpo.reward.ignore_case: expected true or false"),
    (["data.label_column=prompt"], "data.label_column: 'prompt' is data.text_column too"),
    (["task=causal_lm", "data.response_column=response"], "grpo.max_new_tokens: only task grpo reads it (task causal_lm)"),
])
def test_bad_fields_name_their_yaml_path(tmp_path, overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    assert str(err.value).startswith(message)


def test_grpo_trains_another_method(tmp_path):
    """(IA)3 through the same task: the reference is its disabled adapter, the sampled policy its enabled one."""
    summary = train(load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", "method=ia3", "peft={}", "train.max_steps=2",
                                       "data.test_rows=8"]), quiet=True)
    assert summary["method"] == "ia3" and summary["steps"] == 2
    assert 0.0 <= summary["mean_reward"] <= 1.0 and 0.0 <= summary["before_mean_reward"] <= 1.0
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and math.isfinite(m["loss"]) for m in losses)
