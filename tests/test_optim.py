"""LoRA+ optimizer: parameter groups and learning rates, compared with Hugging Face PEFT's."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as ref_create_loraplus_optimizer

import peftkit
from peftkit import create_loraplus_optimizer

from .families import FAMILY

LR, RATIO = 1e-3, 16


def _models(**kwargs):
    kwargs = {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, **kwargs}
    ours = peftkit.get_peft_model(FAMILY["bert"].model(), peftkit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(FAMILY["bert"].model(), peft.LoraConfig(**kwargs))
    return ours, theirs


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _per_param(opt, key="lr"):
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in out, "parameter in two groups"
            out[id(p)] = g[key]
    return out


def _kind(name: str) -> str:
    """Role of a parameter from its name in either library."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return "A"
    if "lora_B" in name or "lora_embedding_B" in name:
        return "B"
    if "magnitude" in name:
        return "magnitude"
    return "other"


def test_groups_cover_every_trainable_parameter_once():
    ours, _ = _models(target_modules=["query", "value"])
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    trainable = _trainable(ours)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})  # no parameter twice
    assert {id(p) for p in grouped} == {id(p) for _, p in trainable}
    assert len(grouped) == len(trainable) == 4 * 2 + 2  # 4 layers x (A, B) + classifier weight, bias
    assert len(opt.param_groups) == 4  # PEFT's four groups, the empty embedding group included
    assert isinstance(opt, torch.optim.AdamW)


def test_lora_b_learns_ratio_times_faster():
    ours, _ = _models(target_modules=["query", "value"])
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    lr = _per_param(opt)
    kinds = {"A": set(), "B": set(), "other": set()}
    for name, p in _trainable(ours):
        kinds[_kind(name)].add(lr[id(p)])
    assert kinds["A"] == {1e-3}
    assert len(kinds["B"]) == 1 and next(iter(kinds["B"])) == pytest.approx(1.6e-2, rel=1e-12)
    n_a = sum(_kind(n) == "A" for n, _ in _trainable(ours))
    n_b = sum(_kind(n) == "B" for n, _ in _trainable(ours))
    assert n_a == n_b == 4


CONFIGS = {
    "query-value": {"target_modules": ["query", "value"]},
    "bias-lora-only": {"target_modules": ["query", "value"], "bias": "lora_only"},
    "dora-bias-all-embedding": {"target_modules": ["query", "value", "word_embeddings"], "use_dora": True,
                                "bias": "all"},
    "all-linear": {"target_modules": "all-linear"},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_learning_rates_match_peft(name):
    ours, theirs = _models(**CONFIGS[name])
    a, b = _trainable(ours), _trainable(theirs)
    assert len(a) == len(b)
    # same construction order in both libraries: pair by position, check shapes and roles agree
    for (na, pa), (nb, pb) in zip(a, b):
        assert pa.shape == pb.shape, (na, nb)
        assert _kind(na) == _kind(nb), (na, nb)
    opt_a = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    opt_b = ref_create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    lr_a, lr_b = _per_param(opt_a), _per_param(opt_b)
    wd_a, wd_b = _per_param(opt_a, "weight_decay"), _per_param(opt_b, "weight_decay")
    diffs = [(nb, lr_a[id(pa)], lr_b[id(pb)]) for (na, pa), (nb, pb) in zip(a, b) if lr_a[id(pa)] != lr_b[id(pb)]]
    assert diffs == []
    assert [wd_a[id(p)] for _, p in a] == [wd_b[id(p)] for _, p in b]
    assert set(lr_a) == {id(p) for _, p in a}


def test_embedding_adapters_use_embedding_lr():
    ours, _ = _models(target_modules=["query", "word_embeddings"])
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=3e-5)
    lr = _per_param(opt)
    emb = {lr[id(p)] for n, p in _trainable(ours) if "word_embeddings" in n and _kind(n) in ("A", "B")}
    assert emb == {3e-5}
    query_b = {lr[id(p)] for n, p in _trainable(ours) if "query" in n and _kind(n) == "B"}
    assert query_b == {LR * RATIO}


def test_kwargs_reach_the_optimizer():
    ours, _ = _models(target_modules=["query"])
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2.0, betas=(0.8, 0.9), eps=1e-6)
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
    assert opt.defaults["lr"] == LR


def test_optimizer_steps_change_only_trainables():
    ours, _ = _models(target_modules=["query", "value"])
    opt = create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    torch.manual_seed(0)
    ours.train()
    out = ours(input_ids=torch.randint(0, 99, (2, 7))).logits
    out.pow(2).mean().backward()
    opt.step()
    for n, p in ours.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("ratio", [0, -1, -0.5])
def test_non_positive_ratio_raises(ratio):
    ours, _ = _models(target_modules=["query"])
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio)


def test_peft_keyword_loraplus_weight_decay_accepted():
    # peft's keyword: popped from kwargs and applied per group (never passed to the optimizer class)
    ours, theirs = _models(target_modules=["query", "value"])
    opt_b = ref_create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                          loraplus_weight_decay=0.1)
    opt_a = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                      loraplus_weight_decay=0.1)
    wd_a, wd_b = _per_param(opt_a, "weight_decay"), _per_param(opt_b, "weight_decay")
    assert [wd_a[id(p)] for _, p in _trainable(ours)] == [wd_b[id(p)] for _, p in _trainable(theirs)]


def test_loraplus_groups_equal_peft_including_empty_ones():
    """Four groups in PEFT's order (A, embedding, B, B without decay), empty ones kept, on a model with LoRA on an
    embedding and a Linear plus a saved head, and on a model without adapters."""
    import copy

    import peft
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    from peftkit import LoraConfig, create_loraplus_optimizer, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)
            self.norm, self.head = torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)

    def summary(opt, model):
        shapes = {id(p): tuple(p.shape) for p in model.parameters()}
        return [(g["lr"], g["weight_decay"], sorted(shapes[id(p)] for p in g["params"])) for g in opt.param_groups]

    torch.manual_seed(0)
    plain = Net()
    kw = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    assert summary(create_loraplus_optimizer(plain, torch.optim.AdamW, **kw), plain) == summary(
        peft_loraplus(plain, torch.optim.AdamW, **kw), plain)
    cfg = dict(r=2, target_modules=["emb", "lin"], modules_to_save=["head"])
    ours = get_peft_model(copy.deepcopy(plain), LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**cfg))
    got = summary(create_loraplus_optimizer(ours, torch.optim.AdamW, **kw), ours)
    assert len(got) == 4 and got == summary(peft_loraplus(theirs, torch.optim.AdamW, **kw), theirs)
