"""Parity with Hugging Face PEFT, one suite for every method that has a peft counterpart.

Driven by a table: per method (a registry name; peft's config class is the one with the same class name,
as ``peftkit bench --vs-peft`` finds it), the model families and configs on which

- both libraries build the same adapter: the same trainable-parameter counts and adapter file keys/shapes
  (``test_same_trainable_state_as_peft``),
- an adapter trained in one library loads in the other with the same outputs, files of the same layout
  (``test_adapter_files_load_both_ways``),
- peft's adapter merges in peftkit into peft's merged weights (``test_merge_matches_peft_merged_weights``),

plus the method's own extra checks (``state_check`` / ``load_check`` / ``merge_check``). Method-specific
tests (kernels, config validation, schedules) stay in ``tests/methods/test_<method>.py``; LoRA's parity
lives in ``test_peft_compat.py``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit

from .families import FAMILY, Family
from .parity import (
    adalora_train_perturbed, assert_loads_both_ways, assert_merges_like_peft, assert_same_file_layout,
    assert_same_trainable_state, linearized, perturb, train_a_little,
)


class PointwiseNet(nn.Module):
    """1x1 convolutions: the kernel size on which PEFT's unmerged OFT Conv2d path is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 12, 1)
        self.conv2 = nn.Conv2d(12, 8, 1, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        return self.head(h.mean(dim=(2, 3)))


FAMILIES = {**FAMILY, "pointwise": Family("pointwise", PointwiseNet, lambda: {"pixel_values": torch.randn(2, 8, 6, 6)},
                                          lambda o: o, targets=["conv1", "conv2"])}

Cases = list[tuple[str, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One method's parity cases and the ways its checks differ from the common ones."""

    name: str  # registry name
    state: Cases  # (family, config kwargs) for test_same_trainable_state_as_peft
    load: Cases  # ... for test_adapter_files_load_both_ways
    merge: Cases = ()  # ... for test_merge_matches_peft_merged_weights
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # kwargs every case starts from
    family_targets: bool = True  # pass the family's explicit targets (False: the role table's defaults)
    per_family: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # extra kwargs per family
    linearize_gpt2: bool = False  # peft cannot wrap GPT-2's Conv1D: its side gets the equivalent nn.Linear
    train: Callable[[nn.Module, Family], None] = train_a_little  # before saving, in both libraries
    min_change: float = 1e-4
    min_change_ref: float | None = None
    layout: tuple[str, ...] = ()  # key suffixes the two saved files must both hold (same keys and shapes)
    merged_agree: bool = False  # after loading both ways, merge_and_unload gives the same outputs in both
    # how peft's adapter for the merge test gets non-trivial values: None = random init (init_weights=False
    # in the case's kwargs) under seed 4
    merge_prepare: Callable[[nn.Module, Family], None] | None = None
    merge_same_outputs: bool = False  # peftkit's loaded model first gives peft's output
    # the base parameters merging may change, from (changed names, family name, adapted layer paths)
    merge_changed: Callable[[list[str], str, set[str]], None] | None = None
    state_check: Callable[[nn.Module, nn.Module, str, object], None] | None = None  # (theirs, ours, family, cfg)
    load_check: Callable[..., None] | None = None  # (family, name, kwargs, folder, mine, loaded)
    quiet: bool = False  # ignore warnings in this method's cases
    same_total: bool = True  # the total parameter counts agree too (not only the trainable ones)

    @property
    def spec(self):
        return peftkit.get_method(self.name)

    def configs(self, name: str, kwargs: dict[str, Any]) -> tuple[object, object]:
        family = FAMILIES[name]
        kw = dict(self.defaults)
        if self.family_targets and family.targets:
            kw["target_modules"] = family.targets
        if family.task_type:
            kw["task_type"] = family.task_type
        kw.update(self.per_family.get(name, {}))
        kw.update(kwargs)
        ours = self.spec.config_cls
        return getattr(peft, ours.__name__)(**kw), ours(**kw)

    def reference_model(self, name: str) -> nn.Module:
        model = FAMILIES[name].model()
        return linearized(model) if self.linearize_gpt2 and name == "gpt2" else model


def only_weights(changed: list[str], name: str, tuned: set[str]) -> None:
    assert changed and all(k.endswith(".weight") for k in changed), changed


# -- the methods' own checks --------------------------------------------------------------------------------
def adalora_same_initial_weights(theirs, ours, name, cfg) -> None:
    ref_state, our_state = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    for key in ref_state:  # the same random draws from the same seed
        assert torch.equal(ref_state[key], our_state[key]), key


def adalora_pruned_files(family, name, kwargs, folder, mine, loaded) -> None:
    a = load_file(folder / "peft" / "adapter_model.safetensors")
    b = load_file(folder / "peftkit" / "adapter_model.safetensors")
    assert all(k.endswith((".lora_A", ".lora_B", ".lora_E")) for k in b if "lora" in k)
    assert not any("ranknum" in k for k in b)  # ranknum is init_r, never saved
    # trained the same way from the same seed: the same pruning, the same files
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ranks = [v.shape[0] for k, v in b.items() if k.endswith(".lora_E")]
    assert sum(ranks) == 2 * len(ranks) and max(ranks) <= 4  # the target budget: target_r per matrix on average
    assert name == "gpt2" or len(set(ranks)) > 1  # spread unevenly (gpt2 has two alike matrices)
    saved = json.loads((folder / "peftkit" / "adapter_config.json").read_text())
    ref_saved = json.loads((folder / "peft" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ref_saved["rank_pattern"]
    assert all(len(m) == 4 for m in saved["rank_pattern"].values())
    # a pruned adapter merges: merged == unmerged, bit-exact unmerge, and peft's merged weights
    theirs = peft.PeftModel.from_pretrained(family.model(), folder / "peftkit")  # a fresh peft copy of our adapter
    assert_merges_like_peft(family, theirs, mine)


def fourierft_targets(theirs, ours, name, cfg) -> None:
    targeted = sorted(n for n, _ in ours.base_model.adapter_layers())
    assert targeted and len(targeted) * 16 <= ours.get_nb_trainable_parameters()[0]
    expected = {"llama": "q_proj", "gpt2": "mlp.c_proj", "bert": "query"}[name]
    assert any(t.endswith(expected) for t in targeted), targeted


def ia3_perturb(model, family=None) -> None:
    perturb(model, scale=0.3, seed=5, only="ia3_l")


def ia3_train(model, family) -> None:
    """A few SGD steps, then a push (the vectors move slowly from 1 on tiny models): non-trivial files."""
    train_a_little(model, family, lr=0.2)
    ia3_perturb(model)


def ia3_targets_and_feedforward(theirs, ours, name, cfg) -> None:
    ref = {n: m.is_feedforward for n, m in theirs.base_model.model.named_modules()
           if isinstance(m, peft.tuners.ia3.IA3Layer)}
    mine = {n: layer.adapters["default"].feedforward for n, layer in ours.base_model.adapter_layers()}
    assert mine == ref and any(mine.values()) and not all(mine.values())
    for n, layer in ours.base_model.adapter_layers():
        a = layer.adapters["default"]
        assert a.ia3_l.shape == theirs.base_model.model.get_submodule(n).ia3_l["default"].shape, n
        assert torch.equal(a.ia3_l, torch.ones_like(a.ia3_l))


def ia3_changed(changed, name, tuned) -> None:
    # output scaling folds into the bias too (the tiny transformers' biases start at 0; the convnet's do not)
    kinds = {k.rsplit(".", 1)[1] for k in changed}
    assert kinds == ({"weight", "bias"} if name == "convnet" else {"weight"}), kinds


def ln_tuning_train(model, family) -> None:
    perturb(model, scale=0.3, seed=4, only="")


def ln_tuning_targets(theirs, ours, name, cfg) -> None:
    ref_targets = {n for n, m in theirs.base_model.model.named_modules()
                   if isinstance(m, peft.tuners.ln_tuning.layer.LNTuningLayer)}
    assert {n for n, _ in ours.base_model.adapter_layers()} == ref_targets
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


def ln_tuning_changed(changed, name, tuned) -> None:
    assert changed and all(k.rpartition(".")[0] in tuned or k.startswith("classifier") for k in changed), changed


def lycoris_train(model, family) -> None:
    train_a_little(model, family)
    perturb(model)


def oft_closed_form_count(theirs, ours, name, cfg) -> None:
    from peftkit.methods.oft import OFTAdapter

    assert ours.get_nb_trainable_parameters()[0] == sum(
        OFTAdapter.param_count(layer.base_layer, cfg, path) for path, layer in ours.base_model.adapter_layers()
    ) + sum(p.numel() for _, w in ours.base_model.saved_modules() for p in w.modules_to_save["default"].parameters())


def vera_perturb(model, family=None) -> None:
    perturb(model, only="vera_lambda")


def vera_train(model, family) -> None:
    """A few SGD steps, then a push (b starts at 0 and moves slowly on tiny models): non-trivial files."""
    train_a_little(model, family)
    vera_perturb(model)


def vera_shared_projections(theirs, ours, name, cfg) -> None:
    shared = ours.base_model.shared_state["default"]
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])


def vera_projections_in_files(family, name, kwargs, folder, mine, loaded) -> None:
    def keys(side):
        return set(load_file(folder / side / "adapter_model.safetensors"))

    for side in ("peft", "peftkit"):
        assert ({"base_model.vera_A", "base_model.vera_B"} <= keys(side)) == kwargs["save_projection"], side
    # two lambda vectors per target: q and v on 2 layers (GPT-2: the fused c_attn)
    assert sum(".vera_lambda_" in k for k in keys("peft")) == 4 * (2 if name != "gpt2" else 1)


def randlora_train(model, family) -> None:
    """A few SGD steps, then a push (lambda starts at 0, so gamma only moves later): non-trivial files."""
    train_a_little(model, family)
    perturb(model, only="randlora_")


def randlora_shared_bases(theirs, ours, name, cfg) -> None:
    shared = ours.base_model.shared_state["default"]
    assert torch.equal(shared.randlora_A, theirs.base_model.randlora_A["default"])
    assert torch.equal(shared.randlora_B, theirs.base_model.randlora_B["default"])


def glora_same_files(family, name, kwargs, folder, mine, loaded) -> None:
    """Both files hold the same keys and shapes, off paths as PEFT's zero buffers (``glora_<X>.zeros``)."""
    a = load_file(folder / "peft" / "adapter_model.safetensors")
    b = load_file(folder / "peftkit" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(".glora_A." in k for k in a) and all(not v.any() for k, v in b.items() if k.endswith(".zeros"))


def glora_changed(changed, name, tuned) -> None:
    """GLoRA folds into the weight and, on layers with a bias (BERT), into the bias (b0 * D + E + W0 C)."""
    kinds = {k.rsplit(".", 1)[1] for k in changed}
    assert kinds == ({"weight", "bias"} if name == "bert" else {"weight"}), kinds


def randlora_bases_in_files(family, name, kwargs, folder, mine, loaded) -> None:
    for side in ("peft", "peftkit"):  # model-level and (as peft writes them) per-layer copies of the bases
        keys = set(load_file(folder / side / "adapter_model.safetensors"))
        assert ("base_model.randlora_A" in keys) == kwargs["save_projection"], side
        assert any(k.endswith("_proj.randlora_B") or k.endswith("c_attn.randlora_B") for k in keys) == kwargs["save_projection"]


def hra_train(model, family) -> None:
    """A few SGD steps, then a push of the reflection vectors (paired equal vectors start as the identity)."""
    train_a_little(model, family)
    perturb(model, only="hra_u")


def delora_train(model, family) -> None:
    """A few SGD steps (B starts at 0), then a push of A, B and lambda: non-trivial files."""
    train_a_little(model, family)
    perturb(model, only="delora_")


def delora_fixed_norms(family, name, kwargs, folder, mine, loaded) -> None:
    """Both files carry the base's per-input-channel weight norms (delora_w_norm), not trained: the same
    (to rounding: GPT-2's Conv1D stores the weight transposed, so the sums run in another order)."""
    a = load_file(folder / "peft" / "adapter_model.safetensors")
    b = load_file(folder / "peftkit" / "adapter_model.safetensors")
    norms = [k for k in a if k.endswith(".delora_w_norm")]
    assert norms
    for k in norms:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=1e-6, msg=k)


def vblora_bank_shared(theirs, ours, name, cfg) -> None:
    """One trained bank per adapter: the tuner's copy is the Parameter every layer's adapter holds."""
    bank = ours.base_model.shared_state["default"].vblora_vector_bank
    assert bank.requires_grad and bank.shape == theirs.base_model.vblora_vector_bank["default"].shape
    assert all(layer.adapters["default"].vblora_vector_bank is bank for _, layer in ours.base_model.adapter_layers())


def vblora_topk_files(family, name, kwargs, folder, mine, loaded) -> None:
    for side in ("peft", "peftkit"):
        keys = load_file(folder / side / "adapter_model.safetensors")
        assert "base_model.vblora_vector_bank" in keys
        topk = kwargs.get("save_only_topk_weights", False)
        assert any(k.endswith("vblora_logits_A_topk_indices") for k in keys) == topk, side
        assert any(k.endswith("vblora_logits_A") for k in keys) != topk, side
        if topk:
            assert next(v for k, v in keys.items() if k.endswith("_topk_indices")).dtype == torch.uint8


def psoft_train(model, family) -> None:
    """A few SGD steps (R starts at I), then a push of R and the magnitude vectors: non-trivial files."""
    train_a_little(model, family)
    perturb(model, only="psoft_R")


def supertuning_same_support(theirs, ours, name, cfg) -> None:
    """The same magnitude-selected support as peft's (positions into the Linear layout, also on GPT-2's Conv1D)."""
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    for key, value in ref.items():
        if key.endswith(".supertuning_indices"):
            assert value.dtype == torch.int32 and torch.equal(mine[key], value), key


def supertuning_train(model, family) -> None:
    train_a_little(model, family)
    perturb(model, only="supertuning_")


def unilora_same_assignment(theirs, ours, name, cfg) -> None:
    """The same indices and scales as peft's, layer by layer (the seeded balanced assignment), one trained theta_d."""
    theta = ours.base_model.shared_state["default"].unilora_theta_d
    assert theta.requires_grad and theta.shape == theirs.base_model.unilora_theta_d["default"].shape
    for path, layer in ours.base_model.adapter_layers():
        ref, mine = theirs.base_model.model.get_submodule(path), layer.adapters["default"]
        assert mine.unilora_theta_d is theta
        for key in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"):
            assert torch.equal(getattr(mine, key), getattr(ref, key)["default"]), (path, key)


def unilora_index_files(family, name, kwargs, folder, mine, loaded) -> None:
    for side in ("peft", "peftkit"):
        keys = set(load_file(folder / side / "adapter_model.safetensors"))
        assert "base_model.unilora_theta_d" in keys
        assert any(k.endswith(".unilora_scales_B") for k in keys) == kwargs["save_indices"], side


def each(families, kwargs=None) -> Cases:
    return [(n, dict(kwargs or {})) for n in families]


# -- the table ------------------------------------------------------------------------------------------------
LYCORIS = dict(linearize_gpt2=True, train=lycoris_train, min_change=1e-3, min_change_ref=0.0, merged_agree=True)
LOHA = each(["llama", "gpt2", "bert", "convnet"], {"r": 4, "alpha": 4}) + [
    ("convnet", {"r": 2, "alpha": 3, "use_effective_conv2d": True}),
    ("llama", {"r": 3, "alpha": 6, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 1.5}}),
]
LOKR = each(["llama", "gpt2", "bert", "convnet"], {"r": 4, "alpha": 4}) + [
    ("llama", {"r": 1, "alpha": 2, "decompose_both": True}),  # low-rank W1 and W2
    ("llama", {"r": 2, "alpha": 3, "decompose_factor": 4, "init_weights": "lycoris"}),
    ("convnet", {"r": 1, "alpha": 2, "use_effective_conv2d": True}),
    ("convnet", {"r": 1, "alpha": 2, "decompose_both": True}),
    ("bert", {"r": 4, "alpha": 4, "rank_pattern": {"value": 1}, "alpha_pattern": {"query": 2}}),
]
# MiSS: the default block (with r = 3 a remainder shard: 32 % 3), bat's (r, r) blocks and mini's tiled block
MISS = each(["llama", "gpt2"], {"r": 4}) + [
    ("llama", {"r": 3}), ("llama", {"r": 4, "init_weights": "bat"}),
    ("llama", {"r": 4, "mini_r": 8, "init_weights": "mini"}),
]
LILY = each(["llama", "gpt2"], {"r": 4}) + [
    ("llama", {"r": 2, "stride_A": 2, "num_B": 3, "scaling": 0.5, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    ("gpt2", {"r": 2, "stride_A": 2, "target_modules": ["c_attn", "c_proj"]}),  # two c_proj shapes: two groups
]
GRALORA = each(["llama", "gpt2"], {"r": 4, "gralora_k": 2}) + [("llama", {"r": 4, "gralora_k": 4, "hybrid_r": 2})]
HIRA = each(["llama", "gpt2"], {"r": 4}) + [("llama", {"r": 3, "rank_pattern": {"v_proj": 2}})]
SHIRA = each(["llama", "gpt2"], {"r": 2, "random_seed": 7}) + [("llama", {"r": 3})]  # 3: the default seed
# peft on a machine without its CUDA extension silently uses one butterfly factor, so parity runs with one
BOFT = [
    ("llama", {"boft_block_size": 4}),
    ("bert", {"boft_block_size": 8}),
    ("gpt2", {"boft_block_num": 4, "boft_block_size": 0}),
    ("convnet", {"boft_block_size": 3}),  # conv widths c_in * 3 * 3: 27 and 72
]
OFT = [
    ("llama", {"oft_block_size": 8}),
    ("bert", {"oft_block_size": 4}),
    ("gpt2", {"oft_block_size": 8}),
    ("pointwise", {"oft_block_size": 4}),
    ("llama", {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False}),
    ("bert", {"oft_block_size": 8, "block_share": True}),
    ("llama", {"oft_block_size": 8, "coft": True, "eps": 1e-2}),
    ("bert", {"oft_block_size": 16, "num_cayley_neumann_terms": 7}),
]

GLORA = each(["llama", "gpt2", "bert"], {"r": 2}) + [  # peft wraps nn.Linear only: its GPT-2 is linearized
    ("bert", {"r": 3, "config_A_B": "vector", "config_C": "vector", "config_D_E": "vector"}),
    ("bert", {"r": 2, "config_A_B": "constant", "config_C": "none", "config_D_E": "none"}),
    ("gpt2", {"r": 2, "config_A_B": "lora", "config_C": "lora", "config_D_E": "vector", "bias": "glora_only"}),
]

# PSOFT: A and B are rebuilt from the base's SVD on load (never saved); r <= min(d_in, d_out) (Llama's v_proj: 16)
PSOFT = each(["llama", "gpt2"], {"r": 4}) + [
    ("llama", {"r": 3, "psoft_orth": False, "psoft_mag_a": False}),
    ("llama", {"r": 4, "ab_svd_init": "pissa_init", "psoft_mag_b": False, "psoft_alpha": 8}),
    ("llama", {"r": 4, "use_cayley_neumann": True, "num_cayley_neumann_terms": 6, "cayley_neumann_eps": 0.9}),
    ("gpt2", {"r": 4, "psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 2, "random_seed": 7}),
]

SUPERTUNING = each(["llama", "gpt2", "bert"], {"sparsity": 0.9}) + [  # peft wraps nn.Linear only: GPT-2 linearized
    ("llama", {"sparsity": 0.95, "r": 2, "lora_alpha": 3}),
    ("gpt2", {"sparsity": 0.9, "r": 2, "lora_dropout": 0.1, "select_top": False}),
    ("bert", {"sparsity": 0.9, "r": 1, "save_precomputed_indices": False}),
]


def road_train(model, family) -> None:
    """A few SGD steps, then a push of the angles and scales (the identity init moves little in 3 steps)."""
    train_a_little(model, family)
    perturb(model, only="road_")


def road_changed(changed, name, tuned) -> None:
    """RoAd folds R into the weight and the bias (R W, R b): every adapted weight changes, nothing else but
    biases of adapted layers (the tiny BERT's are zero, so they stay)."""
    assert {f"{t}.weight" for t in tuned} <= set(changed), changed
    assert all(k.rsplit(".", 1)[0] in tuned and k.endswith((".weight", ".bias")) for k in changed), changed


ROAD = each(["llama", "gpt2", "bert"], {"group_size": 8}) + [  # peft wraps nn.Linear only: its GPT-2 is linearized
    ("llama", {"group_size": 8, "variant": "road_4"}),
    ("bert", {"group_size": 16, "variant": "road_2"}),
    ("gpt2", {"group_size": 4, "variant": "road_4"}),
]


def waveft_train(model, family) -> None:
    """A few SGD steps (the coefficients start at 0), then a push of every coefficient: non-trivial files."""
    train_a_little(model, family, lr=0.1)
    perturb(model, scale=0.05, only="waveft_")


def waveft_same_targets(theirs, ours, name, cfg) -> None:
    """The role table's defaults are peft's (GPT-2: mlp.c_proj), and so are the per-layer coefficient counts."""
    ref = {n.replace("base_model.model.", "", 1): m.waveft_n_frequency["default"] for n, m in theirs.named_modules()
           if hasattr(m, "waveft_n_frequency")}
    mine = {p: a.n for p, a in ours.base_model.adapters("default")}
    assert mine == ref and mine, (mine, ref)


WAVEFT = each(["llama", "gpt2", "bert"]) + [
    ("llama", {"wavelet_family": "db3", "random_loc_seed": 11}), ("gpt2", {"wavelet_family": "sym2"}),
    ("bert", {"wavelet_family": "coif1"}), ("llama", {"use_idwt": False}),
    ("llama", {"proportional_parameters": True, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"]}),
    ("llama", {"n_frequency_pattern": {"v_proj": 7}}),
]


def adamss_train(model, family) -> None:
    """A few SGD steps (B_k starts at 0, so A_k moves from the second), then a push of every factor."""
    train_a_little(model, family)
    perturb(model, only="adamss_")


def adamss_same_init(theirs, ours, name, cfg) -> None:
    """peft's SVD basis and clusters, and (same random stream; GPT-2's linearized copy drew other numbers) its A_k."""
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    for key, value in ref.items():
        if key.endswith(".adamss_newB") or name != "gpt2":
            assert torch.equal(mine[key], value), key
    for path, layer in ours.base_model.adapter_layers():
        ref_layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.adapters["default"].scatter_index, ref_layer.scatter_index["default"]), path


ADAMSS = each(["llama", "gpt2", "bert"], {"r": 8, "num_subspaces": 3, "subspace_rank": 2}) + [
    ("llama", {"r": 6, "num_subspaces": 4, "subspace_rank": 3, "use_dynamic_rank": True, "svd_threshold": 0.5}),
]


def tinylora_train(model, family) -> None:
    """A few SGD steps (v starts at 0 and its gradients are small), then a push of the vectors: non-trivial files."""
    train_a_little(model, family)
    perturb(model, only="tinylora_v")


def tinylora_same_frame(theirs, ours, name, cfg) -> None:
    """peft's SVD frame and projections, layer by layer, and one trained vector per group of tied targets."""
    shared = ours.base_model.shared_state["default"]
    ref_v = theirs.base_model.tinylora_v["default"]
    for path, layer in ours.base_model.adapter_layers():
        ref, mine = theirs.base_model.model.get_submodule(path), layer.adapters["default"]
        for key in ("tinylora_A", "tinylora_B", "tinylora_P"):
            assert torch.equal(getattr(mine, key), getattr(ref, key)["default"]), (path, key)
        group = ref._tinylora_v_key["default"]
        assert mine.tinylora_v is getattr(shared, f"tinylora_v/{group}") and mine.tinylora_v.requires_grad
        if cfg.init_weights is True:  # both start at 0 (uniform draws depend on the global RNG's position)
            assert torch.equal(mine.tinylora_v, ref_v[group]) and not mine.tinylora_v.any(), path
        assert mine.tinylora_v.shape == ref_v[group].shape


def tinylora_files(family, name, kwargs, folder, mine, loaded) -> None:
    for side in ("peft", "peftkit"):  # vectors at the model level, the frame (and P) per layer
        keys = set(load_file(folder / side / "adapter_model.safetensors"))
        assert "base_model.tinylora_v.0" in keys, side
        assert any(k.endswith(".tinylora_P") for k in keys) == kwargs.get("save_projection", True), side



def pvera_perturb(model, family=None) -> None:
    perturb(model, only="pvera_lambda")


def pvera_train(model, family) -> None:
    """A few SGD steps (sampled latents), then a push (b starts at 0): non-trivial files, compared in eval mode."""
    train_a_little(model, family)
    pvera_perturb(model)


def pvera_shared_projections(theirs, ours, name, cfg) -> None:
    shared = ours.base_model.shared_state["default"]
    assert shared.pvera_A.shape[0] == 2 * cfg.r  # mean and log-variance rows
    assert torch.equal(shared.pvera_A, theirs.base_model.pvera_A["default"])
    assert torch.equal(shared.pvera_B, theirs.base_model.pvera_B["default"])


def pvera_projections_in_files(family, name, kwargs, folder, mine, loaded) -> None:
    for side in ("peft", "peftkit"):
        keys = set(load_file(folder / side / "adapter_model.safetensors"))
        assert ({"base_model.pvera_A", "base_model.pvera_B"} <= keys) == kwargs["save_projection"], side
        assert not any(".pvera_A" in k or ".pvera_B" in k for k in keys if not k.startswith("base_model.pvera_"))


def beft_value_biases(theirs, ours, name, cfg) -> None:
    """Only the value projections (GPT-2: the named c_attn) carry a (1, d_out) beft_bias, the same in both."""
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert ref.keys() == mine.keys() and all(k.endswith(".beft_bias") or ".classifier." in k for k in ref)
    assert {k.split(".")[-2] for k in ref if k.endswith(".beft_bias")} == {"c_attn" if name == "gpt2" else "value" if name == "bert" else "v_proj"}
    for key, value in ref.items():
        assert torch.equal(mine[key], value), key  # the same draws from the same seed (zeros or N(0, 1))


def beft_changed(changed, name, tuned) -> None:
    """Merging changes only the value projections' biases."""
    assert changed and {k.rpartition(".")[0] for k in changed} == tuned and all(k.endswith(".bias") for k in changed)


def c3a_same_initial_kernels(theirs, ours, name, cfg) -> None:
    """The same xavier-uniform draws from the same seed (GPT-2: peft's linearized copy draws its Linears first)."""
    if name != "gpt2":
        ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
        for key in ref:
            assert torch.equal(ref[key], mine[key]), key


def osf_same_svd(theirs, ours, name, cfg) -> None:
    """Both start from the base weights' own low singular components (GPT-2: of peft's linearized copy)."""
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=0, msg=key)


def osf_frozen_subspace_kept(family, name, kwargs, folder, mine, loaded) -> None:
    """SGD with projected gradients leaves the top-k singular subspace alone: U_high^T dW = 0 = dW V_high^T."""
    from peftkit.methods.osf.functional import split_svd

    for path, layer in mine.base_model.adapter_layers():
        a = layer.adapters["default"]
        delta = a.delta_weight(layer.base_layer).detach()
        delta = delta.t() if a.transposed else delta
        svd = split_svd(a._natural(layer.base_layer), a.k, delta.dtype)
        assert delta.abs().max() > 1e-4, path
        torch.testing.assert_close(svd["U_high"].t() @ delta, torch.zeros(a.k, a.d_in), atol=2e-5, rtol=0, msg=path)
        torch.testing.assert_close(delta @ svd["V_high"].t(), torch.zeros(a.d_out, a.k), atol=2e-5, rtol=0, msg=path)


def peanut_train(model, family) -> None:
    """A few SGD steps (B starts at 0), then a push of every tweaker layer: non-trivial files."""
    train_a_little(model, family)
    perturb(model, only="peanut_")


def deft_train(model, family) -> None:
    """A few SGD steps from the identity init, then a push of P and R: non-trivial files."""
    train_a_little(model, family)
    perturb(model, scale=0.05, only="deft_")


def deft_same_initial_weights(theirs, ours, name, cfg) -> None:
    """The same draws of P from the same seed, and R = right(P)^T W / s from them (identity at init)."""
    ref_state, our_state = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert any(k.endswith(".deft_P") for k in ref_state)
    for key in ref_state:
        torch.testing.assert_close(our_state[key], ref_state[key], atol=1e-6, rtol=0, msg=key)


def poly_train(model, family) -> None:
    """A few SGD steps (B starts at 0, routers near uniform), then a push of every trained tensor."""
    train_a_little(model, family)
    perturb(model)


# Poly routes each row by task_ids, which both libraries need in the call (n_tasks > 1): families whose inputs
# carry one task id per row (peft's Llama needs CAUSAL_LM to pass them on)
for _name, _tasks in (("llama", [2, 0]), ("bert", [1, 3])):
    FAMILIES[f"{_name}+task_ids"] = dataclasses.replace(
        FAMILY[_name], name=f"{_name}+task_ids",
        inputs=lambda f=FAMILY[_name], t=_tasks: {**f.inputs(), "task_ids": torch.tensor(t)})


def frod_train(model, family) -> None:
    """A few SGD steps, then a push of the trained tensors: non-trivial files."""
    train_a_little(model, family)
    perturb(model, only="frod_lambda")


def frod_same_bases(theirs, ours, name, cfg) -> None:
    """The same per-category bases and sparse patterns, and every layer's frozen U, as peft builds."""
    shared = ours.base_model.shared_state["default"].tensors()
    cats = sorted(theirs.base_model.frod_V)
    assert sorted(k.split("/", 1)[1] for k in shared if k.startswith("frod_V/")) == cats
    for kind in ("frod_V", "frod_s_indices", "frod_s_size"):
        for c in cats:
            assert torch.equal(shared[f"{kind}/{c}"], getattr(theirs.base_model, kind)[c]["default"]), (kind, c)
    their_u = {n.replace(".frod_U.default", ""): b for n, b in theirs.named_buffers() if ".frod_U." in n}
    our_u = {p: layer.adapters["default"].frod_U for p, layer in ours.base_model.adapter_layers()}
    assert len(our_u) == len(their_u) > 0
    for path, u in our_u.items():
        assert torch.equal(u, their_u["base_model.model." + path]), path


def frod_files(family, name, kwargs, folder, mine, loaded) -> None:
    for side in ("peft", "peftkit"):
        keys = set(load_file(folder / side / "adapter_model.safetensors"))
        shared = {k for k in keys if k.startswith(("base_model.frod_V.", "base_model.frod_s_"))}
        assert bool(shared) == kwargs.get("save_projection", True), side
        assert not any(".frod_U" in k for k in keys), side


METHODS = [
    Method(
        "supertuning", state=SUPERTUNING + [("llama", {"sparsity": 0.5, "select_top": False})], load=SUPERTUNING,
        merge=[(n, {"sparsity": 0.8, "r": 2, "init_weights": False}) for n in ("llama", "bert")],
        linearize_gpt2=True, train=supertuning_train, layout=(".supertuning_values",), merged_agree=True,
        merge_changed=only_weights, state_check=supertuning_same_support, quiet=True,
    ),
    Method(
        "glora", state=GLORA + [("llama", {"r": 2, "config_A_B": "none", "config_C": "none", "config_D_E": "none"})],
        load=GLORA, merge=[(n, {"r": 2, "init_weights": False, "config_D_E": "vector"}) for n in ("llama", "bert")],
        linearize_gpt2=True, train=lycoris_train, merged_agree=True, merge_changed=glora_changed,
        load_check=glora_same_files,
    ),
    Method(
        "adalora",
        # a short schedule: warm-up to step 1, budget phase to step 4 (final mask), then 2 steps at the final ranks
        defaults={"init_r": 4, "target_r": 2, "lora_alpha": 8, "tinit": 1, "tfinal": 2, "total_step": 6, "deltaT": 1},
        state=each(["llama", "gpt2", "bert", "convnet", "t5"]),
        load=each(["llama", "gpt2", "bert", "convnet"]),
        train=adalora_train_perturbed, state_check=adalora_same_initial_weights, load_check=adalora_pruned_files,
        same_total=False,  # peft's total also counts its frozen ranknum parameters (one per adapted layer)
    ),
    Method(
        "boft", state=BOFT + [("bert", {"boft_block_size": 4, "bias": "boft_only"})], load=BOFT,
        merge=[(n, {"init_weights": False, "boft_block_size": b}) for n, b in (("llama", 4), ("bert", 4), ("convnet", 3))],
        linearize_gpt2=True, train=lambda m, f: train_a_little(m, f, lr=2.0), min_change=1e-6,
        layout=(".boft_R", ".boft_s"), merged_agree=True, merge_same_outputs=True, merge_changed=only_weights,
    ),
    Method(
        "fourierft", state=each(["llama", "gpt2", "bert"]), load=each(["llama", "gpt2", "bert"]),
        merge=each(["llama", "gpt2", "bert"], {"init_weights": False}),  # random spectrum: an update without training
        defaults={"n_frequency": 16, "scaling": 20.0}, family_targets=False,  # the role table must agree with peft's
        train=lambda m, f: train_a_little(m, f, lr=0.05), layout=(".fourierft_spectrum",),
        merge_changed=only_weights, state_check=fourierft_targets,
    ),
    Method(
        "hira", state=HIRA, load=HIRA, merge=each(["llama", "gpt2"], {"r": 4, "init_weights": False}),
        train=lycoris_train, layout=(".hira_A", ".hira_B"), merged_agree=True, merge_changed=only_weights,
    ),
    Method(
        "ia3", state=each(["llama", "gpt2", "bert", "convnet"]), load=each(["llama", "gpt2", "bert", "convnet"]),
        merge=each(["llama", "gpt2", "bert", "convnet"]),
        # convnet has no PEFT default: explicit targets, the second conv treated as feedforward
        family_targets=False, per_family={"convnet": {"target_modules": ["conv1", "conv2"], "feedforward_modules": ["conv2"]}},
        train=ia3_train, layout=(".ia3_l",), merge_prepare=ia3_perturb, merge_changed=ia3_changed,
        state_check=ia3_targets_and_feedforward,
    ),
    Method(
        "ln_tuning", state=each(["llama", "gpt2", "t5", "bert"]), load=each(["llama", "gpt2", "t5", "bert"]),
        # BERT (SEQ_CLS) is left out: PEFT's LN tuning merge_and_unload keeps the classifier's
        # ModulesToSaveWrapper (keys ``classifier.original_module.*``); peftkit returns the plain model
        # (test_selective_lntuning.py checks that)
        merge=each(["llama", "gpt2", "t5"]),
        family_targets=False, per_family={"bert": {"target_modules": ["LayerNorm"]}},  # peft has no BERT default
        train=ln_tuning_train, layout=(".ln_tuning_layers.weight",), merge_prepare=ln_tuning_train,
        merge_changed=ln_tuning_changed, state_check=ln_tuning_targets,
    ),
    Method("loha", state=LOHA, load=LOHA, **LYCORIS),
    Method("lokr", state=LOKR, load=LOKR, **LYCORIS),
    Method(
        "miss", state=MISS, load=MISS,
        merge=[("llama", {"r": 4, "init_weights": False}), ("llama", {"r": 3, "init_weights": False})],
        linearize_gpt2=True, train=lycoris_train, layout=(".miss_block",), merged_agree=True,
        merge_changed=only_weights,
    ),
    Method(
        "oft", state=OFT + [("convnet", {"r": 1, "oft_block_size": 0})], load=OFT,
        merge=[("llama", {"init_weights": False, "oft_block_size": 8}), ("bert", {"init_weights": False, "oft_block_size": 8}),
               ("convnet", {"init_weights": False, "r": 1, "oft_block_size": 0})],
        linearize_gpt2=True, train=lambda m, f: train_a_little(m, f, lr=2.0), min_change=1e-6,
        layout=(".oft_R.weight",), merged_agree=True, merge_changed=only_weights, state_check=oft_closed_form_count,
    ),
    Method(
        "gralora", state=GRALORA + [("gpt2", {"r": 4, "gralora_k": 4, "hybrid_r": 2})], load=GRALORA,
        merge=[(n, {**kw, "init_weights": False}) for n, kw in GRALORA], defaults={"alpha": 6},
        train=lycoris_train, layout=(".gralora_A", ".gralora_B"), merged_agree=True, merge_changed=only_weights,
    ),
    Method(
        "lily", state=LILY, load=LILY, linearize_gpt2=True, train=lycoris_train, min_change=1e-3, min_change_ref=0.0,
        layout=(".lily_A.weight", ".lily_B.weight", ".lily_router.weight"),
    ),
    Method(
        "randlora", state=each(["llama", "gpt2"]) + [("llama", {"r": 3, "sparse": True}), ("gpt2", {"r": 5, "very_sparse": True})],
        load=[(n, {"save_projection": s, "projection_prng_key": 5}) for s in (True, False) for n in ("llama", "gpt2")],
        merge=each(["llama", "gpt2"], {"init_weights": False}), defaults={"r": 4, "randlora_alpha": 8},
        train=randlora_train, layout=(".randlora_lambda",), merge_changed=only_weights,
        state_check=randlora_shared_bases, load_check=randlora_bases_in_files, quiet=True,
    ),
    Method(
        "vblora", state=each(["llama", "gpt2"]) + [("llama", {"save_only_topk_weights": True})],
        load=[(n, {"save_only_topk_weights": t}) for t in (False, True) for n in ("llama", "gpt2")],
        merge=each(["llama", "gpt2"]), defaults={"r": 2, "num_vectors": 16, "vector_length": 8, "topk": 2},
        layout=(".vblora_vector_bank",), merge_changed=only_weights, merged_agree=True,
        state_check=vblora_bank_shared, load_check=vblora_topk_files,
    ),
    Method(
        "unilora", state=each(["llama", "gpt2"]) + [("llama", {"save_indices": True})],
        load=[(n, {"save_indices": t, "proj_seed": 7}) for t in (False, True) for n in ("llama", "gpt2")],
        merge=each(["llama", "gpt2"]), defaults={"r": 2, "theta_d_length": 64},
        layout=(".unilora_theta_d",), merge_changed=only_weights, merged_agree=True,
        state_check=unilora_same_assignment, load_check=unilora_index_files,
    ),
    Method(
        "shira", state=SHIRA, load=SHIRA, merge=each(["llama"], {"r": 2, "init_weights": False}),
        linearize_gpt2=True, train=lycoris_train, layout=(".shira_weight", ".shira_indices"), merged_agree=True,
        merge_changed=only_weights,
    ),
    Method(
        "vera", state=each(["llama", "gpt2", "bert"]),
        load=[(n, {"save_projection": s, "projection_prng_key": 21}) for s in (True, False) for n in ("llama", "gpt2", "bert")],
        merge=each(["llama", "gpt2", "bert"]), defaults={"r": 8},
        train=vera_train, layout=(".vera_lambda_d",), merge_prepare=vera_perturb, merge_changed=only_weights,
        state_check=vera_shared_projections, load_check=vera_projections_in_files, quiet=True,
    ),
    Method(
        "hra", state=each(["llama", "gpt2"], {"r": 4}) + [("llama", {"r": 3}), ("llama", {"r": 2, "apply_GS": True})],
        load=each(["llama", "gpt2"], {"r": 4}) + [("llama", {"r": 4, "apply_GS": True})],
        merge=[("llama", {"r": 4, "init_weights": False}), ("llama", {"r": 3, "apply_GS": True, "init_weights": False})],
        linearize_gpt2=True, train=hra_train, layout=(".hra_u",), merged_agree=True, merge_changed=only_weights,
        quiet=True,  # odd r: both libraries warn that the symmetric init needs an even r
    ),
    Method(
        "delora", state=each(["llama", "gpt2"], {"r": 4}) + [("llama", {"r": 3, "rank_pattern": {"v_proj": 2}})],
        load=each(["llama", "gpt2"], {"r": 4, "delora_lambda": 3}) + [
            ("llama", {"r": 3, "rank_pattern": {"v_proj": 2}, "lambda_pattern": {"q_proj": 5}})],
        merge=[("llama", {"r": 4, "init_weights": False})],
        linearize_gpt2=True, train=delora_train, layout=(".delora_A", ".delora_w_norm"), merged_agree=True,
        merge_changed=only_weights, load_check=delora_fixed_norms,
    ),
    Method(
        "psoft", state=PSOFT, load=PSOFT,
        merge=[("llama", {"r": 4, "init_weights": False}), ("llama", {"r": 3, "psoft_orth": False, "init_weights": False})],
        linearize_gpt2=True, train=psoft_train, layout=(".psoft_R.weight",), merged_agree=True,
        merge_changed=only_weights,
    ),
    Method(
        "road", state=ROAD, load=ROAD,
        merge=[("llama", {"group_size": 8, "init_weights": False}),
               ("bert", {"group_size": 8, "variant": "road_4", "init_weights": False})],
        linearize_gpt2=True, train=road_train, layout=(".road_theta", ".road_alpha"), merged_agree=True,
        merge_changed=road_changed,
    ),
    Method(
        "waveft", state=WAVEFT, load=WAVEFT,
        merge=each(["llama", "gpt2", "bert"], {"init_weights": False}) + [
            ("llama", {"init_weights": False, "wavelet_family": "db2"})],
        defaults={"n_frequency": 40, "scaling": 5.0}, family_targets=False,  # the role table must agree with peft's
        train=waveft_train, layout=(".waveft_spectrum",), merged_agree=True, merge_same_outputs=True,
        merge_changed=only_weights, state_check=waveft_same_targets, quiet=True,  # peft warns on Conv1D
    ),
    Method(
        "adamss", state=ADAMSS + [("bert", {"num_subspaces": 5}), ("llama", {"r": 8, "num_subspaces": 3, "random_seed": 4})],
        load=ADAMSS, merge=[(n, {"r": 8, "num_subspaces": 3, "subspace_rank": 2, "init_weights": None}) for n in ("llama", "bert")],
        linearize_gpt2=True, train=adamss_train, layout=(".adamss_newB", ".adamss_A.0", ".adamss_B.0"),
        merged_agree=True, merge_changed=only_weights, state_check=adamss_same_init,  # zero biases: V^T's bias column is 0
    ),
    Method(
        "tinylora", state=each(["llama", "gpt2", "bert"]) + [("llama", {"weight_tying": 0.5, "r": 3}),
                                                            ("llama", {"weight_tying": 1.0, "init_weights": "uniform"})],
        load=[(n, {"save_projection": s, "projection_seed": 7}) for s in (True, False) for n in ("llama", "gpt2")]
        + [("bert", {"weight_tying": 0.5})],
        merge=each(["llama", "gpt2"], {"init_weights": "uniform", "init_v_bound": 0.5}), defaults={"r": 2, "u": 8},
        train=tinylora_train, layout=(".tinylora_A", ".tinylora_B"), merged_agree=True, merge_changed=only_weights,
        state_check=tinylora_same_frame, load_check=tinylora_files, quiet=True,  # save_projection=False warns
    ),
    Method(
        "pvera", state=each(["llama", "gpt2", "bert"]) + [("llama", {"sample_at_inference": True, "generator_seed": 3})],
        load=[(n, {"save_projection": s, "projection_prng_key": 21}) for s in (True, False) for n in ("llama", "gpt2")]
        + [("bert", {"save_projection": True, "generator_seed": 5, "pvera_dropout": 0.1})],
        merge=each(["llama", "gpt2", "bert"]), defaults={"r": 8},
        train=pvera_train, layout=(".pvera_lambda_d",), merge_prepare=pvera_perturb, merge_changed=only_weights,
        merged_agree=True, state_check=pvera_shared_projections, load_check=pvera_projections_in_files, quiet=True,
    ),
    Method(
        # peft wraps nn.Linear only and has no GPT-2 default: its GPT-2 is linearized, c_attn named; Llama's
        # v_proj has no bias (both add one and warn; peft cannot merge there, so merges run on BERT)
        "beft", state=each(["llama", "gpt2", "bert"]) + [("bert", {"init_weights": False})],
        load=each(["llama", "gpt2", "bert"]), merge=each(["bert"], {"init_weights": False}),
        family_targets=False, per_family={"gpt2": {"target_modules": ["c_attn"]}}, linearize_gpt2=True,
        layout=(".beft_bias",), merged_agree=False, merge_changed=beft_changed, state_check=beft_value_biases,
        quiet=True,
    ),
    Method(
        "c3a", state=each(["llama", "gpt2", "bert"]) + [("llama", {"block_size": 32, "block_size_pattern": {"v_proj": 16}})],
        load=each(["llama", "gpt2", "bert"]) + [("llama", {"block_size": 4, "init_weights": "gaussian"})],
        merge=each(["llama", "bert"]), defaults={"block_size": 8}, family_targets=False, linearize_gpt2=True,
        layout=(".c3a_kernel",), merged_agree=True, merge_changed=only_weights, state_check=c3a_same_initial_kernels,
    ),
    Method(
        # defaults: peft's OSF table (Llama: all seven projections; GPT-2: c_attn and both c_proj, linearized for
        # peft, which wraps no Conv1D), every linear layer on BERT
        "osf", state=each(["llama", "gpt2", "bert"]) + [("llama", {"effective_rank": 4, "rank_pattern": {"k_proj": 0.25}})],
        load=each(["llama", "gpt2"]) + [("llama", {"effective_rank": 0.75})], merge=each(["llama", "bert"], {"init_weights": False}),
        family_targets=False, linearize_gpt2=True, layout=(".osf_svd_params.U_low", ".osf_svd_params.S_low"),
        merged_agree=True, merge_changed=only_weights, state_check=osf_same_svd, load_check=osf_frozen_subspace_kept,
    ),
    Method(
        # peft wraps nn.Linear only: its GPT-2 is linearized (the same weights read as nn.Linear)
        "peanut", state=each(["llama", "gpt2"], {"r": 4}) + [("llama", {"r": 4, "depth": 2, "act_fn": "gelu"})],
        load=each(["llama", "gpt2"], {"r": 4, "depth": 1}) + [("bert", {"r": 3, "depth": 2, "act_fn": "tanh", "scaling": 0.5})],
        merge=[("llama", {"r": 4, "depth": 1, "init_weights": False}), ("bert", {"r": 3, "init_weights": False})],
        linearize_gpt2=True, train=peanut_train, layout=(".peanut_A.weight", ".peanut_B.weight"), merged_agree=True,
        merge_changed=only_weights,
    ),
    Method(
        # peft wraps nn.Linear only: its GPT-2 is linearized; not mergeable (the weight depends on the row's task);
        # GPT-2's files both ways: tests/methods/test_poly.py (the linearized reference needs the name "gpt2")
        "poly", state=each(["llama", "gpt2", "bert"], {"n_tasks": 3}) + [("llama", {"r": 4, "n_skills": 2, "n_splits": 4})],
        load=[("llama+task_ids", {"n_tasks": 3, "n_splits": 2}), ("bert+task_ids", {"n_tasks": 4, "n_skills": 2})],
        defaults={"r": 2}, per_family={"llama+task_ids": {"task_type": "CAUSAL_LM"}}, linearize_gpt2=True,
        train=poly_train, layout=(".poly_lora_A", ".poly_lora_B", ".poly_router.module_logits"),
    ),
    Method(
        # a prompt method: the input embedding hosts it, no targets; files both ways on BERT (a CAUSAL_LM's logits
        # grow by the virtual tokens; Llama's: tests/methods/test_multitask_prompt_tuning.py)
        "multitask_prompt_tuning", state=each(["llama", "gpt2", "bert"], {"num_tasks": 3, "num_ranks": 2}),
        load=[("bert+task_ids", {"num_tasks": 4, "num_ranks": 2})], defaults={"num_virtual_tokens": 3},
        per_family={"llama": {"task_type": "CAUSAL_LM"}, "gpt2": {"task_type": "CAUSAL_LM"}}, family_targets=False, train=poly_train, layout=("prefix_task_cols", "prefix_task_rows", "prompt_embeddings"),
    ),
    Method(
        # a KV-prefix prompt method on causal LMs (peft 0.21.2 cannot feed a prefix to BERT under transformers 5:
        # "Model does not support past key values"); all frozen (f = n): nothing trains
        "cartridge", state=each(["llama", "gpt2"]) + [("llama", {"num_frozen_tokens": 0}), ("llama", {"num_frozen_tokens": 4})],
        load=each(["llama", "gpt2"]) + [("llama", {"num_frozen_tokens": 0}), ("gpt2", {"num_frozen_tokens": 3})],
        defaults={"num_virtual_tokens": 4}, per_family={"llama": {"task_type": "CAUSAL_LM"}, "gpt2": {"task_type": "CAUSAL_LM"}},
        family_targets=False, layout=("prompt_embeddings",),
    ),
    Method(
        # peft wraps Linear and GPT-2's Conv1D; the UNet (DeFT's field: text-to-image diffusion) on its attention
        "deft", state=each(["llama", "gpt2", "unet"], {"r": 4}) + [("llama", {"r": 3, "para": True})],
        load=[("llama", {"r": 4, "alpha": 8}), ("gpt2", {"r": 4, "decomposition_method": "qr"}), ("unet", {"r": 4}),
              ("llama", {"r": 2, "para": True, "decomposition_method": "qr", "deft_dropout": 0.1})],
        merge=[("llama", {"r": 4, "init_weights": False}), ("gpt2", {"r": 3, "decomposition_method": "qr", "init_weights": False}),
               ("unet", {"r": 4, "alpha": 2, "init_weights": False})],
        per_family={"unet": {"target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}},
        train=deft_train, layout=(".deft_P",), merged_agree=True, merge_changed=only_weights,
        state_check=deft_same_initial_weights, quiet=True,  # peft warns on GPT-2 (fan_in_fan_out set for Conv1D)
    ),
    Method(
        "frod", state=each(["llama", "gpt2", "bert"]) + [("llama", {"sparse_rate": 0.0}), ("bert", {"regularization_alpha": 0.1})],
        load=[(n, {"save_projection": s, "projection_prng_key": 3}) for s in (True, False) for n in ("llama", "gpt2")]
        + [("bert", {"frod_dropout": 0.1})],
        merge=each(["llama", "gpt2", "bert"], {"init_weights": False}), defaults={"sparse_rate": 0.05, "progressbar": False},
        train=frod_train, layout=(".frod_lambda_l", ".frod_lambda_s_values"), merged_agree=True, merge_changed=only_weights,
        state_check=frod_same_bases, load_check=frod_files, quiet=True,  # peft warns on GPT-2 (fan_in_fan_out)
    ),
    Method(
        # whole decoder blocks plus the model-level shadow backbone (one adapter-level network); not mergeable
        # (peft refuses it too). tests/methods/test_shadow.py: generation, aux loss, SEQ_CLS, unload_shadow
        "shadow", state=each(["llama", "gpt2"]) + [("llama", {"share_embeddings": False, "update_hidden_size": 6,
                                                             "shadow_intermediate_size": 20})],
        load=each(["llama", "gpt2"], {"r": 4}) + [("llama", {"shadow_hidden_size": 16, "shadow_num_attention_heads": 2})],
        defaults={"task_type": "CAUSAL_LM"}, family_targets=False, layout=(".shadow_down.default.weight",),
    ),
]
def _id(method: Method, name: str, kwargs: dict[str, Any]) -> str:
    return "-".join([method.name, name, *(f"{k}={v}" for k, v in kwargs.items())])


def _cases(field: str):
    return [pytest.param(m, n, kw, id=_id(m, n, kw)) for m in METHODS for n, kw in getattr(m, field)]


@pytest.fixture(autouse=True)
def _quiet(request):
    """Warnings ignored where the method's table entry says so (VeRA: save_projection=False warns in both)."""
    method = getattr(request.node, "callspec", None) and request.node.callspec.params.get("method")
    with warnings.catch_warnings():
        if method is not None and method.quiet:
            warnings.simplefilter("ignore")
        yield


def test_every_method_is_registered_with_a_peft_counterpart():
    for method in METHODS:
        assert isinstance(getattr(peft, method.spec.config_cls.__name__, None), type), method.name


@pytest.mark.parametrize(("method", "name", "kwargs"), _cases("state"))
def test_same_trainable_state_as_peft(method, name, kwargs):
    ref_cfg, our_cfg = method.configs(name, kwargs)
    theirs = peft.get_peft_model(method.reference_model(name), ref_cfg)
    ours = peftkit.get_peft_model(FAMILIES[name].model(), our_cfg)
    if method.same_total:
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_same_trainable_state(theirs, ours)  # trainable count, adapter file keys and shapes
    if method.state_check:
        method.state_check(theirs, ours, name, our_cfg)


@pytest.mark.parametrize(("method", "name", "kwargs"), _cases("load"))
def test_adapter_files_load_both_ways(method, name, kwargs, tmp_path):
    family = FAMILIES[name]
    ref_cfg, our_cfg = method.configs(name, kwargs)
    mine, loaded = assert_loads_both_ways(
        family, ref_cfg, our_cfg, tmp_path, train=method.train, reference_model=lambda: method.reference_model(name),
        min_change=method.min_change, min_change_ref=method.min_change_ref,
    )
    for suffix in method.layout:
        assert_same_file_layout(tmp_path, suffix)
    if method.merged_agree:  # merged in both libraries: the same weights
        torch.testing.assert_close(family.run(mine.merge_and_unload()), family.run(loaded.merge_and_unload()),
                                   atol=1e-5, rtol=0)
    if method.load_check:
        method.load_check(family, name, kwargs, tmp_path, mine, loaded)


@pytest.mark.parametrize(("method", "name", "kwargs"), _cases("merge"))
def test_merge_matches_peft_merged_weights(method, name, kwargs, tmp_path):
    """peft's adapter (random or pushed off its init) loads in peftkit; merging there gives merged ==
    unmerged, a bit-exact unmerge and peft's merged weights."""
    family = FAMILIES[name]
    ref_cfg, _ = method.configs(name, kwargs)
    if method.merge_prepare is None:
        torch.manual_seed(4)
    theirs = peft.get_peft_model(family.model(), ref_cfg)
    if method.merge_prepare is not None:
        method.merge_prepare(theirs, family)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(family.model(), tmp_path)
    if method.merge_same_outputs:
        torch.testing.assert_close(family.run(ours), family.run(theirs), atol=1e-5, rtol=0)
    tuned = {n for n, _ in ours.base_model.adapter_layers()}
    changed = assert_merges_like_peft(family, theirs, ours)
    method.merge_changed(changed, name, tuned)
