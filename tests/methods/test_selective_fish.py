"""FISH mask: the Fisher diagonal, exact global top-k, zero gradients outside the mask, exact disable /
save / load, sparse files (<= 1.5% of the model at 0.5% density), training memory, and bad inputs."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import FishMaskConfig, PeftConfig, PeftModel, SelectionError, fisher_diagonal, get_peft_model
from peftkit.config import ConfigError
from peftkit.methods.selective.select import choose_format, global_top_k

from peftkit import tiny_models

from ..families import FAMILY, minilm_size_bert

FAMILY_BERT = FAMILY["bert"]


def batches(n: int = 3, rows: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 99, (rows, 7), generator=g), "labels": torch.randint(0, 3, (rows,), generator=g)}
            for _ in range(n)]


def scored_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """What FISH scores on the tiny BERT: every parameter but the task head."""
    return {n: p for n, p in model.named_parameters() if not n.startswith("classifier.")}


def fish_model(density: float = 0.05, **kwargs) -> PeftModel:
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(density=density, task_type="SEQ_CLS", **kwargs))
    model.prepare_selection(batches())
    return model


def dense_grads(model: PeftModel) -> dict[str, torch.Tensor]:
    """Gradient of every selected parameter's delta, in the parameter's full shape."""
    out = {}
    for path, adapter in model.base_model.adapters("default"):
        for pname, fmt in adapter.formats.items():
            (t,) = adapter.theta(pname)
            if fmt == "sparse":
                g = torch.zeros(adapter.shapes[pname]).view(-1).index_add(0, adapter.index(pname), t.grad)
                out[f"{path}.{pname}"] = g.view(adapter.shapes[pname])
            else:
                out[f"{path}.{pname}"] = t.grad
    return out


def masks(model: PeftModel) -> dict[str, torch.Tensor]:
    out = {}
    for path, adapter in model.base_model.adapters("default"):
        for pname, fmt in adapter.formats.items():
            m = torch.zeros(adapter.shapes[pname], dtype=torch.bool)
            if fmt == "sparse":
                m.view(-1)[adapter.index(pname).long()] = True
            elif fmt == "masked":
                m = getattr(adapter, f"{pname}_mask").clone()
            else:
                m[...] = True
            out[f"{path}.{pname}"] = m
    return out


# -- the Fisher diagonal ----------------------------------------------------------------------------------
def test_fisher_diagonal_is_the_mean_squared_per_sample_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).train()
    net[0].weight.requires_grad_(False)
    data = [(torch.randn(3, 3), torch.randint(0, 2, (3,))) for _ in range(3)]

    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    scores = fisher_diagonal(net, data, loss_fn, num_samples=5)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    seen = 0
    net[0].weight.requires_grad_(True)
    for x, y in data:
        for i in range(len(y)):
            if seen == 5:
                break
            grads = torch.autograd.grad(loss_fn(net, (x[i:i + 1], y[i:i + 1])).sum(), list(net.parameters()))
            for (n, _), g in zip(net.named_parameters(), grads):
                expected[n] += g.square() / 5
            seen += 1
    net[0].weight.requires_grad_(False)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], atol=1e-7, rtol=1e-5)
    # pure: flags, mode and .grad as they were
    assert net.training and not net[0].weight.requires_grad and net[2].weight.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_nan_fisher_is_an_error_before_training():
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(density=0.05, task_type="SEQ_CLS"))

    def nan_loss(m, batch):
        return m(**batch).logits.sum(-1) * float("nan")

    with pytest.raises(SelectionError, match=r"Fisher estimate of 'bert\..*' is NaN or inf"):
        model.prepare_selection(batches(), nan_loss)
    assert model.peft_config["default"].selected_params is None
    model.train()
    with pytest.raises(SelectionError, match="prepare_selection"):  # still no mask: training refuses to start
        FAMILY_BERT.run(model).sum().backward()


def test_empty_dataloader_is_an_error():
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(task_type="SEQ_CLS"))
    with pytest.raises(SelectionError, match="no sample"):
        model.prepare_selection([])
    with pytest.raises(SelectionError, match="needs a dataloader"):
        model.prepare_selection()


# -- the mask ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.005, 0.05, 0.5, 1.0])
def test_keeps_exactly_round_density_n_entries_with_the_largest_fisher(density):
    base = FAMILY_BERT.model()
    params = scored_params(base)
    n = sum(p.numel() for p in params.values())
    model = fish_model(density)
    kept = masks(model)
    assert sum(int(m.sum()) for m in kept.values()) == round(density * n)
    recorded = model.peft_config["default"].selected_params
    assert sum(v["nnz"] for v in recorded.values()) == round(density * n)
    # the kept entries are the top scores of an independent estimate on the same base
    scores = fisher_diagonal(base, batches(), num_samples=1024, params=params)
    low = min(float(scores[k][m].min()) for k, m in kept.items())
    high = max((float(s[~kept[k]].max()) for k, s in scores.items() if k in kept and (~kept[k]).any()), default=-1.0)
    high = max([high] + [float(s.max()) for k, s in scores.items() if k not in kept])
    assert low >= high


def test_top_k_instead_of_density():
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(top_k=123, task_type="SEQ_CLS"))
    model.prepare_selection(batches())
    assert sum(int(m.sum()) for m in masks(model).values()) == 123


@pytest.mark.parametrize("density", [0.02, 0.5])
def test_gradients_outside_the_mask_are_zero_after_backward(density):
    model = fish_model(density).train()
    formats = {a.formats[p] for _, a in model.base_model.adapters("default") for p in a.formats}
    assert "sparse" in formats and (density < 0.1 or "masked" in formats)
    FAMILY_BERT.run(model).pow(2).mean().backward()
    grads, kept = dense_grads(model), masks(model)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for key, g in grads.items():
        assert torch.count_nonzero(g[~kept[key]]) == 0, key
    for name, p in model.get_base_model().named_parameters():
        if ".adapters." not in name and ".modules_to_save." not in name:
            assert p.grad is None and not p.requires_grad, name


def test_training_moves_only_masked_entries_and_disable_save_load_are_exact(tmp_path):
    model = fish_model(0.05)
    base_out = FAMILY_BERT.run(FAMILY_BERT.model())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(4, seed=1):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    tuned = FAMILY_BERT.run(model)
    assert (tuned - base_out).abs().max() > 1e-3
    for _ in range(2):
        with model.disable_adapter():
            assert torch.equal(FAMILY_BERT.run(model), base_out)
        assert torch.equal(FAMILY_BERT.run(model), tuned)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(FAMILY_BERT.model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(FAMILY_BERT.run(loaded), FAMILY_BERT.run(model))
    kept = masks(model)
    base = dict(FAMILY_BERT.model().named_parameters())
    plain = dict(model.merge_and_unload().named_parameters())
    for key, m in kept.items():
        changed = plain[key] != base[key]
        assert not changed[~m].any(), key


def test_prepare_selection_from_given_scores_or_mask():
    params = scored_params(FAMILY_BERT.model())
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in enumerate(params.items())}
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(top_k=50, task_type="SEQ_CLS"))
    model.prepare_selection(scores=scores)
    chosen = {k: m.nonzero().flatten() for k, m in ((k, m.view(-1)) for k, m in masks(model).items())}
    assert {k: v.tolist() for k, v in chosen.items()} == {k: v.tolist() for k, v in global_top_k(scores, 50).items()}
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(task_type="SEQ_CLS"))
    model.prepare_selection(mask={"bert.pooler.dense.weight": torch.tensor([3, 1, 7])})
    assert {k: m.view(-1).nonzero().flatten().tolist() for k, m in masks(model).items()} == {
        "bert.pooler.dense.weight": [1, 3, 7]}
    with pytest.raises(SelectionError, match="outside"):
        model.prepare_selection(mask={"bert.pooler.dense.weight": torch.tensor([32 * 32])})


def test_configured_from_a_dict_with_the_default_loss():
    config = PeftConfig.from_dict({"peft_type": "FISH_MASK", "density": 0.01, "num_samples": 6, "task_type": "SEQ_CLS"})
    model = get_peft_model(FAMILY_BERT.model(), config)
    model.prepare_selection(batches())  # the generic hook: loss from the batch's labels
    model.prepare_selection(batches())  # a second call keeps the mask
    n = sum(p.numel() for p in scored_params(FAMILY_BERT.model()).values())
    assert sum(int(m.sum()) for m in masks(model).values()) == round(0.01 * n)
    lora = get_peft_model(FAMILY_BERT.model(), peftkit.LoraConfig(task_type="SEQ_CLS"))
    lora.prepare_selection(batches())  # a no-op for methods without a data step


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, True, "0.1"])
def test_density_outside_0_1_is_rejected(density):
    with pytest.raises(ConfigError, match=r"FishMaskConfig.density: expected a fraction in \(0, 1\]"):
        FishMaskConfig(density=density)


def test_density_that_keeps_nothing_and_conflicting_fields():
    with pytest.raises(ConfigError, match="density or top_k"):
        FishMaskConfig(density=0.1, top_k=5)
    with pytest.raises(ConfigError, match="top_k"):
        FishMaskConfig(top_k=0)
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(density=1e-9, task_type="SEQ_CLS"))
    with pytest.raises(SelectionError, match="keeps 0 of the"):
        model.prepare_selection(batches())


def test_loading_onto_a_model_with_other_shapes_fails_clearly(tmp_path):
    model = get_peft_model(FAMILY_BERT.model(), FishMaskConfig(density=0.5, criterion="random", task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    other = tiny_models.bert(intermediate_size=40)  # the bert family with wider feed-forward layers
    with pytest.raises(SelectionError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.(weight|bias)' has "
                                             r"shape \((40, 32|40,)\) in this model but \((37, 32|37,)\) in the adapter"):
        PeftModel.from_pretrained(other, tmp_path)


# -- formats ----------------------------------------------------------------------------------------------
def test_storage_format_is_the_smaller_one():
    assert choose_format(1000, 1000, 4) == "full"
    assert choose_format(1000, 10, 4) == "sparse"  # 80 bytes against 5000
    assert choose_format(1000, 625, 4) == "sparse"  # 5000 = 5000: indices + values
    assert choose_format(1000, 626, 4) == "masked"


def test_global_top_k_breaks_ties_by_order():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([2.0, 3.0])}
    assert {k: v.tolist() for k, v in global_top_k(scores, 3).items()} == {"a": [1, 2], "b": [1]}
    assert {k: v.tolist() for k, v in global_top_k(scores, 4).items()} == {"a": [1, 2], "b": [0, 1]}


# -- MiniLM-size model: file size and training memory -----------------------------------------------------
@pytest.fixture(scope="module")
def minilm_size():
    return minilm_size_bert


def test_file_at_half_a_percent_density_is_under_1_5_percent_of_the_model(minilm_size, tmp_path):
    model = get_peft_model(minilm_size(), FishMaskConfig(density=0.005, task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 20000, (2, 16), generator=g), "labels": torch.tensor([0, 1])}]
    model.prepare_selection(data)
    model.save_pretrained(tmp_path / "fish")
    save_file({k: v.contiguous() for k, v in minilm_size().state_dict().items()}, tmp_path / "full.safetensors")
    ratio = os.path.getsize(tmp_path / "fish" / "adapter_model.safetensors") / os.path.getsize(tmp_path / "full.safetensors")
    assert ratio <= 0.015, ratio
    saved = load_file(tmp_path / "fish" / "adapter_model.safetensors")
    assert all(v.dtype == torch.int32 for k, v in saved.items() if k.endswith(".indices"))
    loaded = PeftModel.from_pretrained(minilm_size(), tmp_path / "fish")
    batch = {"input_ids": torch.randint(1000, 20000, (2, 12), generator=g)}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)


def saved_bytes(model: nn.Module, batch) -> int:
    """Bytes autograd keeps for the backward pass, parameters' own storage excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch).logits.sum()
    out.backward()  # (outside the hooks: what the backward pass builds is transient)
    return sum(seen.values())


@pytest.mark.parametrize("method", ["fish_mask", "diff_pruning"])
def test_training_keeps_no_second_copy_of_the_weights(minilm_size, method):
    batch = {"input_ids": torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))}
    full = minilm_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    activations = saved_bytes(full.train(), batch)  # full fine-tuning: activations only
    config = (FishMaskConfig(density=0.005, criterion="random", task_type="SEQ_CLS") if method == "fish_mask"
              else peftkit.DiffPruningConfig(task_type="SEQ_CLS"))
    model = get_peft_model(minilm_size(), config).train()
    extra = saved_bytes(model, batch) - activations
    # the selected entries' own tensors are parameters (excluded); what is left must be far from a weight copy
    assert extra < 0.02 * weight_bytes, (extra, weight_bytes)
