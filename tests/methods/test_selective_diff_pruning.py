"""Diff pruning: hard-concrete gates, the expected-L0 penalty's gradient, exact projection to a sparsity,
and the projected adapter's file size on a MiniLM-size model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from peftkit import DiffPruningConfig, PeftModel, get_peft_model, l0_penalty, project_to_sparsity
from peftkit.config import ConfigError
from peftkit.methods.selective.diff_pruning import DiffPruningAdapter

from ..families import FAMILY, minilm_size_bert

BERT = FAMILY["bert"]


def n_targeted() -> int:
    return sum(p.numel() for n, p in BERT.model().named_parameters() if not n.startswith("classifier."))


def adapters(model):
    return [a for _, a in model.base_model.adapters("default")]


def trained(steps: int = 3, **kwargs) -> PeftModel:
    model = get_peft_model(BERT.model(), DiffPruningConfig(task_type="SEQ_CLS", alpha_init=1.0, **kwargs)).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        BERT.run(model).pow(2).mean().backward()
        opt.step()
    return model.eval()


def test_starts_at_the_base_with_two_tensors_per_parameter():
    model = get_peft_model(BERT.model(), DiffPruningConfig(task_type="SEQ_CLS"))
    assert torch.equal(BERT.run(model), BERT.run(BERT.model()))
    head = sum(p.numel() for p in BERT.model().classifier.parameters())
    assert model.get_nb_trainable_parameters()[0] == 2 * n_targeted() + head


def test_hard_concrete_gates():
    adapter = adapters(get_peft_model(BERT.model(), DiffPruningConfig(task_type="SEQ_CLS")))[0]
    la = torch.tensor([-10.0, 0.0, 0.5, 10.0])
    # evaluation: clamp(sigmoid(log_alpha) (r - l) + l, 0, 1) with (l, r) = (-1.5, 1.5)
    torch.testing.assert_close(adapter.gate(la, None), torch.tensor([0.0, 0.0, torch.sigmoid(la[2]) * 3 - 1.5, 1.0]))
    z1, z2 = adapter.gate(torch.zeros(10_000), 7), adapter.gate(torch.zeros(10_000), 7)
    assert torch.equal(z1, z2) and not torch.equal(z1, adapter.gate(torch.zeros(10_000), 8))
    assert z1.min() == 0 and z1.max() == 1
    # log_alpha = 0: z = 0 when u < 1/2, z = 1 when u > 5/6, in between otherwise
    assert abs(float((z1 == 0).float().mean()) - 0.5) < 0.02 and abs(float((z1 == 1).float().mean()) - 1 / 6) < 0.02


def test_l0_penalty_value_and_gradient():
    config = DiffPruningConfig(task_type="SEQ_CLS", l0_lambda=1e-3, alpha_init=0.5)
    model = get_peft_model(BERT.model(), config).train()
    s = torch.sigmoid(torch.tensor(0.5))  # limits symmetric: E[L0] per entry = sigmoid(log_alpha)
    torch.testing.assert_close(l0_penalty(model), n_targeted() * s, rtol=1e-5, atol=0)
    BERT.run(model).pow(2).mean().backward()
    # w starts at 0, so the data term gives log_alpha no gradient: what arrives is lambda dE[L0]/dlog_alpha
    for adapter in adapters(model):
        for pname in adapter.formats:
            grad = getattr(adapter, f"{pname}_log_alpha").grad
            torch.testing.assert_close(grad, torch.full_like(grad, 1e-3 * float(s * (1 - s))))


def test_training_is_stochastic_and_evaluation_deterministic():
    model = trained()
    inputs = BERT.inputs()  # (``BERT.run`` reseeds the generator the gate noise comes from)
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("density", [0.01, 0.2])
def test_projection_keeps_exactly_the_largest_diffs(density, tmp_path):
    model = trained()
    diffs = {f"{path}.{p}": a.dense(p).detach().clone() for path, a in model.base_model.adapters("default") for p in a.formats}
    assert project_to_sparsity(model, density) == round(density * n_targeted())
    assert not any(isinstance(a, DiffPruningAdapter) and "gated" in a.formats.values() for a in adapters(model))
    kept = {}
    for path, a in model.base_model.adapters("default"):
        for p in a.formats:
            kept[f"{path}.{p}"] = a.dense(p).detach()
    assert sum(int((v != 0).sum()) for v in kept.values()) <= round(density * n_targeted())
    assert sum(v["nnz"] for v in model.peft_config["default"].selected_params.values()) == round(density * n_targeted())
    low = min(float(d.abs()[kept[k] != 0].min()) for k, d in diffs.items() if k in kept and (kept[k] != 0).any())
    for k, d in diffs.items():
        k_kept = kept.get(k, torch.zeros_like(d))
        assert torch.equal(k_kept[k_kept != 0], d[k_kept != 0]), k  # kept values are the trained diffs
        assert (d.abs()[k_kept == 0] <= low).all(), k
    expected = BERT.run(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BERT.model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(BERT.run(loaded), expected)
    with model.disable_adapter():
        assert torch.equal(BERT.run(model), BERT.run(BERT.model()))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"density": 0}, "density"), ({"density": 1.01}, "density"), ({"l0_lambda": -1}, "l0_lambda"),
    ({"limit_l": 0.1}, "limit_l"), ({"limit_r": 1.0}, "limit_r"), ({"temperature": 0}, "temperature"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=f"DiffPruningConfig.{field}"):
        DiffPruningConfig(**kwargs)


def test_projected_file_at_half_a_percent_is_under_1_5_percent_of_the_model(tmp_path):
    build = minilm_size_bert
    model = get_peft_model(build(), DiffPruningConfig(task_type="SEQ_CLS", density=0.005)).train()
    batch = {"input_ids": torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).logits.pow(2).sum().backward()
    opt.step()
    project_to_sparsity(model)
    model.save_pretrained(tmp_path / "diff")
    save_file({k: v.contiguous() for k, v in build().state_dict().items()}, tmp_path / "full.safetensors")
    ratio = os.path.getsize(tmp_path / "diff" / "adapter_model.safetensors") / os.path.getsize(tmp_path / "full.safetensors")
    assert ratio <= 0.015, ratio
