"""LoRA's orthogonal and data-driven initialisations (issue 22): orthogonal, EVA, CorDA, LoRA-GA, each
compared with Hugging Face PEFT 0.21.2 on seeded tiny models and calibration batches."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
import types

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.layers import AdapterLayer

TOL = dict(atol=1e-5, rtol=1e-5)


class Tiny(nn.Module):
    """Linear layers, two of them reading the same input (EVA's equal-input path)."""

    def __init__(self, d: int = 12, h: int = 16, spread: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.emb2 = nn.Embedding(20, h)
        self.q = nn.Linear(d, h)
        self.k = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(h, h)
        self.out = nn.Linear(h, 8)
        if spread:  # q / k: a few dominant input directions, up: many (EVA moves ranks to up)
            with torch.no_grad():
                self.emb.weight.mul_(torch.logspace(2, -3, d))

    def forward(self, input_ids=None, attention_mask=None, labels=None, x=None):
        x = self.emb(input_ids) if x is None else x
        h = torch.tanh(self.q(x)) * self.k(x) + self.up(self.emb2(input_ids))
        return self.out(torch.relu(h))


class TinyConv1D(nn.Module):
    """GPT-2's transposed Conv1D layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.c_fc = Conv1D(16, 12)  # weight (12, 16)
        self.c_proj = Conv1D(8, 16)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return self.c_proj(torch.tanh(self.c_fc(self.emb(input_ids))))


def tiny(cls=Tiny, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).eval()


def batches(n: int = 4, seed: int = 1, length: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 20, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # padding EVA must leave out
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def ours_factors(model: nn.Module, name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {path.replace("base_model.model.", ""): (m.adapters[name].lora_A.detach(), m.adapters[name].lora_B.detach())
            for path, m in model.named_modules() if isinstance(m, AdapterLayer) and name in m.adapters}


def peft_factors(model: nn.Module, name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {path.replace("base_model.model.", ""): (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach())
            for path, m in model.named_modules() if hasattr(m, "lora_A") and name in getattr(m, "lora_A", {})}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base weight, under the plain model's names."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or ".adapters." in name:
            continue
        out[name.replace("base_model.model.", "").replace(".base_layer", "")] = p.detach().clone()
    return out


def assert_same_factors(ours: dict, ref: dict, tol: dict = TOL) -> None:
    assert ours.keys() == ref.keys() and ours, (sorted(ours), sorted(ref))
    for key in ours:
        torch.testing.assert_close(ours[key][0], ref[key][0], **tol, msg=f"{key} lora_A")
        torch.testing.assert_close(ours[key][1], ref[key][1], **tol, msg=f"{key} lora_B")


def assert_same_base(ours: nn.Module, ref: nn.Module, tol: dict = TOL) -> None:
    a, b = base_weights(ours), base_weights(ref)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=key)


def outputs(model: nn.Module, data: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b) for b in data])


# -- 1. orthogonal ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, targets", [(Tiny, ["q", "k", "out"]), (TinyConv1D, ["c_fc", "c_proj"])])
def test_orthogonal_matches_peft_and_starts_from_the_base(cls, targets):
    base = tiny(cls)
    data = batches(2)
    y0 = outputs(base, data)
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="orthogonal")
    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(7)
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw))
    f = ours_factors(ours)
    assert_same_factors(f, peft_factors(ref))
    assert_same_base(ours, ref)
    for A, B in f.values():
        assert A.abs().min() > 0 and B.abs().min() > 0  # both factors non-zero ...
        torch.testing.assert_close(B @ A, torch.zeros(B.shape[0], A.shape[1]), atol=1e-6, rtol=0)  # ... B A = 0
    torch.testing.assert_close(outputs(ours, data), y0, **TOL)  # the base model's outputs


def test_orthogonal_odd_rank_is_refused_and_the_model_untouched():
    base = tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="requires the LoRA rank to be even, got 3"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(r=3, target_modules=["q", "k"], init_lora_weights="orthogonal"))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_new_init_names_are_accepted_and_bad_ones_named():
    for init in ("orthogonal", "eva", "corda"):
        peftkit.LoraConfig(init_lora_weights=init)
    peftkit.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peftkit.LoraGAConfig())
    with pytest.raises(ValueError, match="init_lora_weights.*'orthogonal'"):
        peftkit.LoraConfig(init_lora_weights="orthogonl")


# -- 2. EVA -----------------------------------------------------------------------------------------------
def eva_pair(base: nn.Module, data: list[dict], targets=("q", "k", "up", "out"), r: int = 2, **eva):
    """peft's and peftkit's EVA-initialised models on copies of ``base``."""
    kw = dict(r=r, lora_alpha=4, target_modules=list(targets), init_lora_weights="eva")
    torch.manual_seed(3)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw, eva_config=peft.EvaConfig(**eva)))
    peft.initialize_lora_eva_weights(ref, data, show_progress_bar=False)
    torch.manual_seed(3)
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw, eva_config=peftkit.EvaConfig(**eva)))
    peftkit.initialize_lora_eva_weights(ours, data, show_progress_bar=False)
    return ref, ours


@pytest.mark.parametrize("eva, targets", [
    ({}, ("q", "k", "up", "out")),
    ({"rho": 1.0}, ("q", "k", "up", "out")),
    ({"rho": 3.0, "adjust_scaling_factors": False}, ("q", "k", "up", "out")),
    # whitening on layers with distinct inputs (peft whitens a PCA shared by q and k twice, in place; see eva.py)
    ({"whiten": True, "tau": 0.9}, ("q", "up", "out")),
])
def test_eva_matches_peft_with_rank_redistribution(eva, targets):
    base = tiny()
    data = batches(6)
    y0 = outputs(base, data)
    ref, ours = eva_pair(base, data, targets, **eva)
    f, f_ref = ours_factors(ours), peft_factors(ref)
    # peft's components come from a seeded randomised SVD with svd_flip signs: the same values, signs included
    assert_same_factors(f, f_ref, tol=dict(atol=1e-4, rtol=1e-4))
    c, c_ref = ours.peft_config["default"], ref.peft_config["default"]
    assert c.rank_pattern == c_ref.rank_pattern and c.alpha_pattern == c_ref.alpha_pattern
    assert set(c.target_modules) == set(c_ref.target_modules)
    if eva.get("rho", 2.0) > 1.0:
        assert sum(A.shape[0] for A, _ in f.values()) == 2 * len(targets)  # the budget, however redistributed
        assert any(A.shape[0] != 2 for A, _ in f.values())  # ... and redistributed here
    else:
        assert all(A.shape[0] == 2 for A, _ in f.values())
    for (A, B), path in zip(f.values(), f):
        assert not B.any()  # B zero: the model starts from the base model's outputs
        assert A.shape[1] == (12 if path in ("q", "k") else 16)
    torch.testing.assert_close(outputs(ours, data), y0, atol=0, rtol=0)
    torch.testing.assert_close(outputs(ours, data), outputs(ref, data), **TOL)
    # the same A as peft's layer scaling: alpha adjusted to the new rank
    for path, m in ours.named_modules():
        if isinstance(m, AdapterLayer):
            key = path.replace("base_model.model.", "")
            assert m.adapters["default"].scaling == pytest.approx(ref.get_submodule(path).scaling["default"]), key


def test_eva_state_dict_on_a_plain_model_equals_the_peft_models_and_peft():
    base = tiny()
    data = batches(5)
    kw = dict(r=2, lora_alpha=4, target_modules=["q", "k", "out"], init_lora_weights="eva")
    sd_ref = peft.get_eva_state_dict(copy.deepcopy(base), data, peft_config=peft.LoraConfig(**kw),
                                     show_progress_bar=False)
    sd = peftkit.get_eva_state_dict(copy.deepcopy(base), data, peft_config=peftkit.LoraConfig(**kw),
                                    show_progress_bar=False)
    assert sd.keys() == sd_ref.keys() == {"q", "k", "out"}
    for k in sd:
        torch.testing.assert_close(sd[k], sd_ref[k], atol=1e-4, rtol=1e-4, msg=k)
    # a precomputed state dict (plain names) initialises the PeftModel the same way
    model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw))
    peftkit.initialize_lora_eva_weights(model, eva_state_dict=sd)
    for k, (A, _) in ours_factors(model).items():
        torch.testing.assert_close(A, sd[k].float(), atol=0, rtol=0)


def test_eva_rank_zero_layer_loses_its_adapter():
    base = tiny()
    data = batches(4)
    model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["q", "out"],
                                                                           init_lora_weights="eva"))
    sd = {"base_model.model.q": torch.randn(4, 12), "base_model.model.out": torch.zeros(0, 16)}
    peftkit.initialize_lora_eva_weights(model, eva_state_dict=sd)
    assert isinstance(model.base_model.model.out, nn.Linear) and not isinstance(model.base_model.model.out,
                                                                                AdapterLayer)
    c = model.peft_config["default"]
    assert c.target_modules == {"q"} and c.rank_pattern == {"q": 4} and c.alpha_pattern == {"q": 16.0}
    A = model.base_model.model.q.adapters["default"].lora_A
    assert A.shape == (4, 12) and A.requires_grad


def test_eva_bad_input():
    base = tiny()
    data = batches(2)
    y0 = outputs(base, data)
    model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["q", "k"],
                                                                           init_lora_weights="eva"))
    # as peft: before initialize_lora_eva_weights the adapter is a placeholder with B = 0 (the base's outputs)
    torch.testing.assert_close(outputs(model, data), y0, atol=0, rtol=0)
    with pytest.raises(ValueError, match="dataloader is required if eva_state_dict is not provided"):
        peftkit.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="dataloader is empty"):
        peftkit.initialize_lora_eva_weights(model, [])
    with pytest.raises(ValueError, match="model must be a PeftModel"):
        peftkit.initialize_lora_eva_weights(copy.deepcopy(base), data)
    with pytest.raises(ValueError, match="peft_config is required"):
        peftkit.get_eva_state_dict(copy.deepcopy(base), data)
    other = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match="only be used with `init_lora_weights='eva'`"):
        peftkit.initialize_lora_eva_weights(other, data)
    with pytest.raises(ValueError, match="rho"):
        peftkit.EvaConfig(rho=0.5)


def test_eva_names_are_served_as_peft():
    import importlib

    from peftkit.compat import facade

    module = facade.build_module("peft")
    for name in ("EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights", "CordaConfig", "LoraGAConfig",
                 "preprocess_loraga"):
        assert getattr(module, name) is getattr(peftkit, name)
    assert facade.build_module("peft.tuners.lora.corda").preprocess_corda is peftkit.preprocess_corda
    assert facade.build_module("peft.tuners.lora.config").EvaConfig is peftkit.EvaConfig
    assert importlib.import_module("peftkit.methods.lora.eva").get_eva_state_dict is peftkit.get_eva_state_dict


# -- 3. CorDA ---------------------------------------------------------------------------------------------
def single_batches(n: int = 6, seed: int = 2) -> list[dict]:
    """Batches of one sequence (peft's covariance hook takes ``input.squeeze(0)`` as the token matrix)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 20, (1, 12), generator=g)} for _ in range(n)]


def peft_corda():
    """peft's corda module (it imports ``attr.dataclass``; where attrs is not installed, the standard dataclass
    stands in for it while the module loads: it only makes a plain container of three tensors)."""
    try:
        return importlib.import_module("peft.tuners.lora.corda")
    except ModuleNotFoundError as e:
        if e.name != "attr":
            raise
    sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    try:
        return importlib.import_module("peft.tuners.lora.corda")
    finally:
        del sys.modules["attr"]


def corda_model(lib, base: nn.Module, data: list[dict], targets, method: str, r: int = 4, **extra):
    model = copy.deepcopy(base)
    config = lib.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), init_lora_weights="corda",
                            corda_config=lib_corda_config(lib, corda_method=method), **extra)
    preprocess = peft_corda().preprocess_corda if lib is peft else peftkit.preprocess_corda
    preprocess(model, config, run_model=lambda: [model(**b) for b in data])
    return lib.get_peft_model(model, config)


def lib_corda_config(lib, **kw):
    return (peft.tuners.lora.config.CordaConfig if lib is peft else peftkit.CordaConfig)(**kw)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("cls, targets", [(Tiny, ["q", "up", "out"]), (TinyConv1D, ["c_fc", "c_proj"])])
def test_corda_matches_peft_and_starts_from_the_base(method, cls, targets):
    base = tiny(cls)
    data = single_batches()
    y0 = outputs(base, data)
    ref = corda_model(peft, base, data, targets, method)
    ours = corda_model(peftkit, base, data, targets, method)
    f = ours_factors(ours)
    # both take torch.linalg.svd of the same W C: the same singular vectors, signs included
    assert_same_factors(f, peft_factors(ref), tol=dict(atol=1e-4, rtol=1e-4))
    assert_same_base(ours, ref, tol=dict(atol=1e-4, rtol=1e-4))
    changed = [k for k, v in base_weights(ours).items() if not torch.equal(v, dict(base.named_parameters())[k])]
    assert sorted(changed) == sorted(f"{t}.weight" for t in targets)  # W - s B A on every target, nothing else
    torch.testing.assert_close(outputs(ours, data), y0, atol=1e-4, rtol=1e-4)  # the base model's outputs
    for module in ours.modules():
        assert not hasattr(module, "eigens") and not hasattr(module, "covariance_matrix")


def test_corda_ipm_takes_the_largest_components_kpm_the_smallest():
    base = tiny()
    data = single_batches()
    norms = {}
    for method in ("ipm", "kpm"):
        model = corda_model(peftkit, base, data, ["up"], method)
        A, B = ours_factors(model)["up"]
        norms[method] = (B @ A).norm()
    assert norms["ipm"] > 2 * norms["kpm"]


def test_corda_cache_file_gives_the_same_init(tmp_path):
    base = tiny()
    data = single_batches()
    cfg = dict(corda_method="kpm", cache_file=str(tmp_path / "c" / "cache.pt"),
               covariance_file=str(tmp_path / "c" / "cov.pt"))
    first = copy.deepcopy(base)
    config = peftkit.LoraConfig(r=4, target_modules=["q", "out"], init_lora_weights="corda",
                                corda_config=peftkit.CordaConfig(**cfg))
    peftkit.preprocess_corda(first, config, run_model=lambda: [first(**b) for b in data])
    first = peftkit.get_peft_model(first, config)
    second = copy.deepcopy(base)
    peftkit.preprocess_corda(second, config)  # no run_model: read from the cache
    second = peftkit.get_peft_model(second, config)
    assert_same_factors(ours_factors(second), ours_factors(first), tol=dict(atol=0, rtol=0))


def test_corda_without_preprocessing_is_refused_and_the_model_untouched():
    base = tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = peftkit.LoraConfig(r=4, target_modules=["q", "out"], init_lora_weights="corda")
    with pytest.raises(ValueError, match=r"init_lora_weights='corda'.*eigens.*preprocess_corda"):
        peftkit.get_peft_model(base, config)
    # prepared with other targets than the model gets: refused before any base weight changes
    data = single_batches(2)
    peftkit.preprocess_corda(base, peftkit.LoraConfig(r=4, target_modules=["q"], init_lora_weights="corda"),
                             run_model=lambda: [base(**b) for b in data])
    with pytest.raises(ValueError, match=r"preprocess_corda prepared 1 of the 2 targeted layers.*'out'"):
        peftkit.get_peft_model(base, config)
    # prepared for another rank: refused before any base weight changes
    with pytest.raises(ValueError, match=r"Matrix U size mismatch"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["q"], init_lora_weights="corda"))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="run_model must be given"):
        peftkit.preprocess_corda(copy.deepcopy(base), config)


# -- 4. LoRA-GA -------------------------------------------------------------------------------------------
def loraga_model(lib, base: nn.Module, data: list[dict], targets, r: int = 2, seed: int = 5, **ga):
    model = copy.deepcopy(base)
    config = lib.LoraConfig(r=r, lora_alpha=4, target_modules=list(targets), init_lora_weights="lora_ga",
                            lora_ga_config=lib.LoraGAConfig(**ga))

    def train_step():
        for b in data:
            model(**b).pow(2).mean().backward()

    lib.preprocess_loraga(model, config, train_step)
    torch.manual_seed(seed)  # the randomised SVD (and "random" direction) draw from the default generator
    return lib.get_peft_model(model, config)


@pytest.mark.parametrize("ga", [{}, {"direction": "ArBr", "scale": "unit"},
                                {"direction": "A2rBr", "scale": "weight_svd"},
                                {"direction": "random", "scale": "gd_scale"}])
@pytest.mark.parametrize("cls, targets", [(Tiny, ["q", "up", "out"]), (TinyConv1D, ["c_fc", "c_proj"])])
def test_loraga_matches_peft_and_starts_from_the_base(ga, cls, targets):
    base = tiny(cls, **({"spread": False} if cls is Tiny else {}))
    data = batches(3)
    y0 = outputs(base, data)
    ref = loraga_model(peft, base, data, targets, **ga)
    ours = loraga_model(peftkit, base, data, targets, **ga)
    f = ours_factors(ours)
    # the same seeded randomised SVD of the same gradient: the same singular vectors, signs included
    assert_same_factors(f, peft_factors(ref), tol=dict(atol=1e-4, rtol=1e-4))
    assert_same_base(ours, ref, tol=dict(atol=1e-5, rtol=1e-5))
    for A, B in f.values():
        assert B.abs().sum() > 0 and A.abs().sum() > 0
    changed = [k for k, v in base_weights(ours).items() if not torch.equal(v, dict(base.named_parameters())[k])]
    assert sorted(changed) == sorted(f"{t}.weight" for t in targets)  # W - s B A on every target, nothing else
    y = outputs(ours, data)
    torch.testing.assert_close(y, outputs(ref, data), **TOL)
    torch.testing.assert_close(y, y0, **TOL)  # the base model's outputs
    for module in ours.modules():
        assert not hasattr(module, "_peft_loraga_grad")
    for p in ours.parameters():
        assert p.grad is None


def test_loraga_preprocessing_restores_flags_and_mode_and_uses_the_cache(tmp_path):
    base = tiny()
    base.emb.weight.requires_grad_(False)
    data = batches(2)
    config = peftkit.LoraConfig(r=2, target_modules=["q", "out"], init_lora_weights="lora_ga",
                                lora_ga_config=peftkit.LoraGAConfig())
    model = copy.deepcopy(base)
    cache = str(tmp_path / "g" / "grads.pt")
    peftkit.preprocess_loraga(model, config, lambda: [model(**b).sum().backward() for b in data], cache_file=cache)
    assert not model.training and not model.emb.weight.requires_grad and model.q.weight.requires_grad
    assert model.q.weight.grad is None and model.q._peft_loraga_grad.shape == model.q.weight.shape
    again = copy.deepcopy(base)
    peftkit.preprocess_loraga(again, config, lambda: None, cache_file=cache)  # read back, train_step not needed
    torch.testing.assert_close(again.q._peft_loraga_grad, model.q._peft_loraga_grad, atol=0, rtol=0)


def test_loraga_bad_input():
    base = tiny()
    data = batches(2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_ga_config=LoraGAConfig"):
        peftkit.preprocess_loraga(base, peftkit.LoraConfig(r=2, target_modules=["q"], init_lora_weights="lora_ga"),
                                  lambda: None)
    config = peftkit.LoraConfig(r=2, target_modules=["q", "out"], init_lora_weights="lora_ga",
                                lora_ga_config=peftkit.LoraGAConfig())
    # without preprocess_loraga: peft's fallback (the default init, base untouched), with a warning naming it
    with pytest.warns(UserWarning, match="no gradient from preprocess_loraga"):
        model = peftkit.get_peft_model(copy.deepcopy(base), config)
    for A, B in ours_factors(model).values():
        assert not B.any() and A.any()
    torch.testing.assert_close(outputs(model, data), outputs(base, data), atol=0, rtol=0)
    # prepared on other targets than the model gets: refused before any base weight changes
    peftkit.preprocess_loraga(base, peftkit.LoraConfig(r=2, target_modules=["q"], init_lora_weights="lora_ga",
                                                       lora_ga_config=peftkit.LoraGAConfig()),
                              lambda: [base(**b).sum().backward() for b in data])
    with pytest.raises(ValueError, match=r"preprocess_loraga prepared 1 of the 2 targeted layers.*'out'"):
        peftkit.get_peft_model(base, config)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="LoraGAConfig.direction"):
        peftkit.LoraGAConfig(direction="AB")


def test_eva_adapter_saves_loads_both_ways_with_peft(tmp_path):
    base = tiny()
    data = batches(6)
    ref, ours = eva_pair(base, data)
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))  # no data needed to load
    assert_same_factors(peft_factors(loaded), ours_factors(ours), tol=dict(atol=0, rtol=0))
    assert isinstance(loaded.peft_config["default"].eva_config, peft.EvaConfig)
    ref.save_pretrained(str(tmp_path / "ref"))
    back = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ref"))
    assert_same_factors(ours_factors(back), peft_factors(ref), tol=dict(atol=0, rtol=0))
    c = back.peft_config["default"]
    assert isinstance(c.eva_config, peftkit.EvaConfig) and c.rank_pattern == ref.peft_config["default"].rank_pattern
