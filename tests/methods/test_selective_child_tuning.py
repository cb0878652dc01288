"""Child-Tuning: F's per-step Bernoulli gradient mask (rescaled), D's fixed Fisher-chosen child network."""

from __future__ import annotations

import pytest
import torch

from peftkit import ChildTuningConfig, FishMaskConfig, get_peft_model
from peftkit.config import ConfigError

from ..families import FAMILY

BERT = FAMILY["bert"]


def batches(n: int = 3, rows: int = 4):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 99, (rows, 7), generator=g), "labels": torch.randint(0, 3, (rows,), generator=g)}
            for _ in range(n)]


def grads(model):
    return {f"{path}.{p}": a.theta(p)[0].grad.clone() for path, a in model.base_model.adapters("default") for p in a.formats}


@torch.no_grad()
def perturb(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _, a in model.base_model.adapters("default"):
        for p in a.formats:
            t = a.theta(p)[0]
            t.add_(0.05 * torch.randn(t.shape, generator=g))


def test_f_masks_each_gradient_entry_with_probability_p_and_rescales():
    p = 0.3
    masked = get_peft_model(BERT.model(), ChildTuningConfig(mode="F", reserve_p=p, task_type="SEQ_CLS")).train()
    plain = get_peft_model(BERT.model(), ChildTuningConfig(mode="F", reserve_p=1.0, task_type="SEQ_CLS")).train()
    perturb(masked), perturb(plain)
    torch.manual_seed(0)
    BERT.run(masked).pow(2).mean().backward()
    BERT.run(plain).pow(2).mean().backward()
    a, b = grads(masked), grads(plain)
    kept = total = 0
    for key in b:
        nonzero = a[key] != 0
        torch.testing.assert_close(a[key][nonzero], b[key][nonzero] / p, rtol=1e-5, atol=1e-9)
        kept += int((nonzero & (b[key] != 0)).sum())
        total += int((b[key] != 0).sum())
    assert abs(kept / total - p) < 0.02, kept / total
    # a fresh mask every backward pass
    first = grads(masked)
    masked.zero_grad()
    masked(**BERT.inputs()).logits.pow(2).mean().backward()  # no reseeding (``BERT.run`` would)
    second = grads(masked)
    assert any(not torch.equal(first[k] != 0, second[k] != 0) for k in first)


def test_f_trains_every_targeted_entry():
    model = get_peft_model(BERT.model(), ChildTuningConfig(mode="F", task_type="SEQ_CLS"))
    n = sum(p.numel() for name, p in BERT.model().named_parameters() if not name.startswith("classifier."))
    head = sum(p.numel() for p in BERT.model().classifier.parameters())
    assert model.get_nb_trainable_parameters()[0] == n + head


def test_d_is_the_fisher_top_p_child_network():
    p = 0.3
    child = get_peft_model(BERT.model(), ChildTuningConfig(mode="D", reserve_p=p, task_type="SEQ_CLS"))
    fish = get_peft_model(BERT.model(), FishMaskConfig(density=p, task_type="SEQ_CLS"))
    child.prepare_selection(batches())
    fish.prepare_selection(batches())
    a, b = child.peft_config["default"].selected_params, fish.peft_config["default"].selected_params
    n = sum(q.numel() for name, q in BERT.model().named_parameters() if not name.startswith("classifier."))
    assert a == b and sum(v["nnz"] for v in a.values()) == round(p * n)
    for (_, x), (_, y) in zip(child.base_model.adapters("default"), fish.base_model.adapters("default")):
        assert all(torch.equal(u, v) for u, v in zip(x.buffers(), y.buffers()))
    # fixed: the same entries train on every step, the others get no gradient
    child.train()
    BERT.run(child).pow(2).mean().backward()
    for _, adapter in child.base_model.adapters("default"):
        for pname, fmt in adapter.formats.items():
            if fmt == "masked":
                g = adapter.theta(pname)[0].grad
                assert torch.count_nonzero(g[~getattr(adapter, f"{pname}_mask")]) == 0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"reserve_p": 0}, "reserve_p"), ({"reserve_p": 1.2}, "reserve_p"), ({"mode": "E"}, "mode"),
    ({"criterion": "magnitude"}, "criterion"), ({"num_samples": 0}, "num_samples"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=f"ChildTuningConfig.{field}"):
        ChildTuningConfig(**kwargs)
