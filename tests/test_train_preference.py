"""`peftkit train` with `task: dpo`: the four preference losses against their formulas, response-only
log-probabilities, the reference as the same model with its adapter disabled, a short run on the tiny recipe,
and recipe errors named by their YAML path."""

from __future__ import annotations

import decimal
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from peftkit import LoraConfig, get_peft_model
from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.data import DataError
from peftkit.train.preference import PreferenceSpec, log1mexp, pair_loss, reference_logps, response_logps
from peftkit.train.preference_task import llama_tiny
from peftkit.train.tasks import TASKS

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "agnews_dpo_tiny.yaml")

# summed response log-probs of 3 pairs (rows: chosen 1..3, then rejected 1..3), their token counts, and
# the reference's summed log-probs
LOGPS = [-4.0, -9.5, -2.25, -6.0, -7.0, -5.5]
COUNTS = [2, 5, 1, 3, 4, 2]
REF = [-5.0, -8.0, -3.0, -5.5, -7.5, -4.0]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _by_hand(loss: str, beta: float, lam: float, gamma: float) -> tuple[list[float], list[float]]:
    """Per-pair losses and reward differences, from the papers' formulas in plain floats."""
    losses, margins = [], []
    for i in range(3):
        pc, pr, rc, rr = LOGPS[i], LOGPS[3 + i], REF[i], REF[3 + i]
        ac, ar = pc / COUNTS[i], pr / COUNTS[3 + i]
        h = (pc - rc) - (pr - rr)
        if loss == "dpo":
            losses.append(-math.log(_sig(beta * h)))
        elif loss == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        elif loss == "orpo":
            odds = math.log(math.exp(ac) / (1 - math.exp(ac))) - math.log(math.exp(ar) / (1 - math.exp(ar)))
            losses.append(-ac + lam * -math.log(_sig(odds)))
        else:
            losses.append(-math.log(_sig(beta * (ac - ar) - gamma)))
        margins.append(beta * h if loss in ("dpo", "ipo") else beta * (ac - ar))
    return losses, margins


@pytest.mark.parametrize("loss", ["dpo", "ipo", "orpo", "simpo"])
def test_each_loss_is_its_formula(loss):
    spec = PreferenceSpec(loss=loss, beta=0.7, orpo_lambda=0.3, simpo_gamma=0.4)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out = pair_loss(spec, t(LOGPS), torch.tensor(COUNTS), t(REF))
    losses, margins = _by_hand(loss, 0.7, 0.3, 0.4)
    torch.testing.assert_close(out.losses, t(losses), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, t(losses).mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards - out.rejected_rewards, t(margins), rtol=0, atol=1e-12)


def test_reference_free_losses_ignore_the_reference_and_dpo_needs_one():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    for loss in ("orpo", "simpo"):
        a = pair_loss(PreferenceSpec(loss=loss), t(LOGPS), torch.tensor(COUNTS), t(REF)).losses
        b = pair_loss(PreferenceSpec(loss=loss), t(LOGPS), torch.tensor(COUNTS), None).losses
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="reference"):
        pair_loss(PreferenceSpec(loss="dpo"), t(LOGPS), torch.tensor(COUNTS), None)


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -0.7, -3.0, -40.0], dtype=torch.float64)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        exact = [float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()]
    exact = torch.tensor(exact, dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), exact, rtol=1e-12, atol=0)
    assert torch.isfinite(log1mexp(torch.zeros(1))).all()  # a certain response still gives finite log-odds


def _task(tmp_path, *overrides):
    recipe = load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    task = TASKS["dpo"](recipe)
    task.load_data()
    return task


def _perturbed_policy(task):
    model = get_peft_model(task.load_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def test_logps_cover_the_response_tokens_only(tmp_path):
    task = _task(tmp_path)
    model = _perturbed_policy(task)
    batch = task.batch([0, 1, 2])
    assert batch["input_ids"].shape[0] == 6  # 3 chosen rows, then 3 rejected rows
    with torch.no_grad():
        sums, counts = response_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    for i, (prompt, chosen, rejected) in enumerate(task.train_rows[:3] * 2):
        response = chosen if i < 3 else rejected
        r = task.tok(response, add_special_tokens=False)["input_ids"]  # MiniLM has no EOS token
        p = task._prompt_ids(prompt)[-(96 - len(r)):]
        ids = batch["input_ids"][i]
        assert ids[: len(p) + len(r)].tolist() == p + r
        manual = sum(float(logp[i, len(p) - 1 + j, r[j]]) for j in range(len(r)))
        assert int(counts[i]) == len(r)
        assert abs(float(sums[i]) - manual) < 1e-5


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
    batch = task.batch([3, 4, 5, 6])
    n_params = sum(p.numel() for p in model.parameters())
    loss = task.loss(model, batch)  # DPO: the policy forward, then the reference forward
    assert len(calls) == 1 and len(built) == 1  # the reference came from disable_adapter, no model was built
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        ref = reference_logps(model, batch)
        policy = response_logps(model, batch)[0]
    _, base = llama_tiny()  # a separate copy of the base weights, built here only to compare
    with torch.no_grad():
        base_logps = response_logps(base.eval(), batch)[0]
    torch.testing.assert_close(ref, base_logps, rtol=0, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-2  # the adapter does change the policy
    h = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.1 * h).mean(), rtol=0, atol=1e-6)
    assert loss.requires_grad


def test_label_accuracy_compares_the_candidates_log_probs(tmp_path):
    task = _task(tmp_path, "data.test_rows=6")
    model = _perturbed_policy(task)
    metrics = task.evaluate(model)
    candidates = task.recipe.preference.candidates
    correct = 0
    with torch.no_grad():
        for prompt, chosen, _ in task.test_rows:
            scores = response_logps(model, task.encode([(prompt, c) for c in candidates]))[0]
            correct += candidates[int(scores.argmax())] == chosen
    assert metrics["label_accuracy"] == correct / 6
    with torch.no_grad():
        out = pair_loss(task.recipe.preference, *response_logps(model, task.pair_batch(task.test_rows)),
                        reference_logps(model, task.pair_batch(task.test_rows)))
    diff = out.chosen_rewards - out.rejected_rewards
    assert metrics["reward_accuracy"] == pytest.approx(float((diff > 0).float().mean()))
    assert metrics["reward_margin"] == pytest.approx(float(diff.mean()), abs=1e-5)


def test_dpo_run_reports_rewards_before_and_after(tmp_path):
    summary = train(load_recipe(TINY, [f"output_dir={tmp_path / 'run'}"]), quiet=True)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("reward_accuracy", "reward_margin", "label_accuracy", "test_loss"):
        assert on_disk[key] == summary[key] and f"before_{key}" in on_disk
    assert on_disk["main_metric"] == "reward_accuracy"
    # a zero-initialised LoRA adapter: the policy is the reference, every implicit reward is 0
    assert on_disk["before_reward_accuracy"] == 0.0 and abs(on_disk["before_reward_margin"]) < 1e-6
    assert on_disk["before_test_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert on_disk["reward_margin"] > 0.01 and on_disk["reward_accuracy"] > 0.5
    assert on_disk["test_loss"] < math.log(2)


@pytest.mark.parametrize("loss", ["ipo", "orpo", "simpo"])
def test_other_losses_train_and_report(tmp_path, loss):
    summary = train(load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"preference.loss={loss}",
                                       "train.max_steps=3", "data.test_rows=8"]), quiet=True)
    for key in ("reward_accuracy", "reward_margin", "test_loss"):
        assert math.isfinite(summary[key]) and math.isfinite(summary[f"before_{key}"])
    if loss == "ipo":  # policy = reference before training: h = 0, loss (1 / (2 beta))^2 = 25
        assert summary["before_test_loss"] == pytest.approx(25.0, abs=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["preference.loss=kto"], "preference.loss: expected one of dpo, ipo, orpo, simpo, got 'kto'"),
    (["preference.beta=0"], "preference.beta: expected a positive number"),
    (["preference.beta=fast"], "preference.beta: expected a number, got 'fast'"),
    (["preference.beta=.nan"], "preference.beta: expected a finite number"),
    (["preference.simpo_gamma=1.0"], "preference.simpo_gamma: only loss simpo reads it (loss dpo)"),
    (["preference.loss=orpo", "preference.orpo_lambda=-1"], "preference.orpo_lambda: expected a number >= 0"),
    (["preference.typo=1"], "preference.typo: unknown key"),
    (["preference.candidates=[World]"], "preference.candidates: expected at least 2 distinct"),
    (["preference.chosen_column=prompt"], "data.text_column: 'prompt' names another column too"),
    (["task=causal_lm", "data.response_column=chosen"], "preference.candidates: only task dpo reads it"),
])
def test_bad_fields_name_their_yaml_path(tmp_path, overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    assert str(err.value).startswith(message)


def test_bad_rows_are_reported_by_line(tmp_path):
    rows = [{"prompt": "a", "chosen": "World", "rejected": "Sports"},
            {"prompt": "b", "chosen": "World", "rejected": "World"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f"data.train={tmp_path / 'pairs.jsonl'}"
    with pytest.raises(DataError, match=r"pairs.jsonl:2: chosen and rejected responses are the same"):
        _task(tmp_path, source)
    assert len(_task(tmp_path, source, "data.bad_rows=skip").train_rows) == 1
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "c", "chosen": "Weather", "rejected": "World"}))
    with pytest.raises(DataError, match=r"test.jsonl:1: chosen response 'Weather' is not one of"):
        _task(tmp_path, source, "data.bad_rows=skip", f"data.test={tmp_path / 'test.jsonl'}")


@pytest.mark.parametrize("method, peft", [("ia3", "{}"), ("prompt_tuning", "{num_virtual_tokens: 4}")])
def test_other_methods_train_with_dpo(tmp_path, method, peft):
    """The task is the method's business only through the PeftModel: (IA)3 starts at the base (policy =
    reference: the DPO loss is log 2), prompt tuning adds virtual tokens the response log-probs must skip."""
    summary = train(load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"method={method}", f"peft={peft}",
                                       "train.max_steps=4", "train.lr=5e-2", "data.test_rows=8"]), quiet=True)
    for key in ("reward_accuracy", "reward_margin", "test_loss"):
        assert math.isfinite(summary[key]) and math.isfinite(summary[f"before_{key}"])
    if method == "ia3":
        assert summary["before_test_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["test_loss"] != summary["before_test_loss"]  # the adapter moved the implicit rewards
