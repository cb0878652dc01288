"""Configurations of the selective methods (DESIGN.md section 2, "selection").

Every selective config records, once the adapter is built, *which* base parameters it changes in
``selected_params``: ``"<module path>.<parameter>" -> {"shape": [...], "nnz": n, "format": f}``. The record
goes into ``adapter_config.json``, so a saved adapter rebuilds exactly the same selection, and loading it
onto a model whose parameter shapes differ fails with an error naming the parameter and both shapes.

Formats (how one selected parameter is held, in memory and in the file):

- ``full``: every entry trains; a dense delta (``<param>.delta``).
- ``sparse``: some entries train; their flat indices (int32 below 2**31 entries) and values
  (``<param>.indices`` + ``<param>.values``).
- ``masked``: most entries train; a dense delta and a boolean mask (``<param>.delta`` + ``<param>.mask``),
  used when that is smaller than indices plus values.
- ``gated``: diff pruning before projection; a dense delta and hard-concrete gate logits
  (``<param>.delta`` + ``<param>.log_alpha``).

LN tuning (``LNTuningConfig``, in ``layernorm.py``) keeps Hugging Face PEFT's fields and file layout and
does not use ``selected_params``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...config import ConfigError, PeftConfig, is_int, is_number

FORMATS = ("full", "sparse", "masked", "gated")
CRITERIA = ("fisher", "random")


class SelectionError(ValueError):
    """A selection cannot be made or does not fit the model (bad Fisher estimate, wrong shapes, no mask yet)."""


@dataclasses.dataclass
class SelectiveConfig(PeftConfig):
    """Fields every selective method shares (LN tuning aside).

    Args:
        modules_to_save: modules trained in full and saved with the adapter (the task head is added
            automatically for classification task types).
        selected_params: filled in by peftkit, not by hand: the base parameters the adapter changes, with
            their shapes, entry counts and storage formats (see the module docstring).
    """

    modules_to_save: list[str] | None = None
    selected_params: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selected_params is not None:
            ok = isinstance(self.selected_params, dict) and all(
                isinstance(v, dict) and v.get("format") in FORMATS and is_int(v.get("nnz"))
                and isinstance(v.get("shape"), (list, tuple))
                for v in self.selected_params.values()
            )
            self._check(ok, "selected_params", "a dict '<module>.<param>' -> {shape, nnz, format} written by peftkit")

    def _check_density(self, field: str) -> None:
        value = getattr(self, field)
        self._check(is_number(value) and 0 < value <= 1, field, "a fraction in (0, 1]")


@dataclasses.dataclass
class BitFitConfig(SelectiveConfig):
    """BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): train only bias terms.

    Args:
        target_modules: modules whose bias trains (PEFT matching: names / dotted suffixes, or a full-match
            regex); None trains every bias of the model (LayerNorm biases included). The paper's small
            variant trains only the query and FFN-intermediate biases: ``["query", "intermediate.dense"]``.
        exclude_modules: names or regex never to train.
    """

    PEFT_TYPE: ClassVar[str] = "BITFIT"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()


@dataclasses.dataclass
class LastKConfig(SelectiveConfig):
    """Last-k layer tuning (partial fine-tuning; Lee et al. 2019, arXiv 1911.03090): only the top ``k``
    blocks (and the head) train; ``k = 0`` is linear probing.

    Args:
        k: number of top blocks to train in every block stack (an encoder-decoder or a two-tower model
            has two stacks).
        layers_to_transform: explicit block indices instead of the top ``k`` (an index the model does not
            have is an error).
        layers_pattern: name(s) of the block list (``"layer"``, ``"layers"``, ``"h"``, ``"block"`` ...);
            None finds the model's outermost block lists by those usual names, and for a model without any
            treats its parameter-holding leaf modules, in order, as the layers.
    """

    PEFT_TYPE: ClassVar[str] = "LAST_K"

    k: int = 1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(is_int(self.k) and self.k >= 0, "k", "a non-negative integer")
        layers = self.layers_to_transform
        if is_int(layers):
            self.layers_to_transform = layers = [layers]
        self._check(layers is None or (isinstance(layers, list) and all(is_int(i) and i >= 0 for i in layers)),
                    "layers_to_transform", "a list of non-negative layer indices")


@dataclasses.dataclass
class _MaskConfig(SelectiveConfig):
    """Shared fields of the mask-selecting methods (FISH mask, Child-Tuning D)."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    num_samples: int = 1024
    criterion: str = "fisher"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(is_int(self.num_samples) and self.num_samples > 0, "num_samples", "a positive integer")
        self._check(self.criterion in CRITERIA, "criterion", f"one of {CRITERIA}")
        self._check(is_int(self.seed), "seed", "an integer")


@dataclasses.dataclass
class FishMaskConfig(_MaskConfig):
    """FISH mask (Sung et al. 2021, arXiv 2111.09839): a fixed sparse mask of the parameters with the largest
    empirical Fisher information, chosen once before training; only those entries train.

    Args:
        density: fraction of the targeted entries to keep, in (0, 1] (the paper uses 0.005); exactly
            ``round(density * N)`` entries are kept over all targeted parameters together (global top-k).
        top_k: keep exactly this many entries instead (give ``density`` or ``top_k``, not both).
        target_modules / exclude_modules: which modules' parameters compete (None: every parameter of the
            model except the task head and tied / shared ones).
        num_samples: samples the Fisher diagonal averages over (the paper: 1024).
        criterion: ``"fisher"`` (needs ``model.prepare_selection(dataloader, loss_fn)`` before training) or
            ``"random"`` (the paper's random-mask baseline, drawn from ``seed``; needs no data).
    """

    PEFT_TYPE: ClassVar[str] = "FISH_MASK"

    density: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.density is not None and self.top_k is not None:
            raise ConfigError("FishMaskConfig: give density or top_k, not both")
        if self.top_k is None:
            if self.density is None:
                self.density = 0.005
            self._check_density("density")
        else:
            self._check(is_int(self.top_k) and self.top_k > 0, "top_k", "a positive integer")


@dataclasses.dataclass
class ChildTuningConfig(_MaskConfig):
    """Child-Tuning (Xu et al. 2021, arXiv 2109.05687): update only a child network of the model.

    Args:
        mode: ``"F"`` (task-free): every step, each gradient entry is kept with probability ``reserve_p``
            and rescaled by ``1 / reserve_p``; ``"D"`` (task-driven): a fixed child network, the
            ``reserve_p`` fraction of entries with the largest Fisher information.
        reserve_p: the kept fraction p_F / p_D, in (0, 1].
        criterion / num_samples / seed: how mode D picks its child network (as in ``FishMaskConfig``).
    """

    PEFT_TYPE: ClassVar[str] = "CHILD_TUNING"

    mode: str = "F"
    reserve_p: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.mode in ("F", "D"), "mode", "'F' (per-step Bernoulli mask) or 'D' (fixed Fisher mask)")
        self._check_density("reserve_p")


@dataclasses.dataclass
class DiffPruningConfig(SelectiveConfig):
    """Diff pruning (Guo et al. 2021, arXiv 2012.07463): theta = theta0 + z * w with hard-concrete L0 gates
    z (Louizos et al. 2018), an expected-L0 penalty, and a projection to an exact sparsity after training.

    Args:
        target_modules / exclude_modules: which modules' parameters get a diff (None: all but the head).
        density: the fraction of entries ``project_to_sparsity`` keeps (global top-k by |z * w|).
        l0_lambda: weight of the expected-L0 penalty ``sum sigmoid(log_alpha - T log(-l / r))``; its
            gradient is added in the backward pass, so any training loop optimises ``loss + l0_lambda * L0``
            (the paper: 1.25e-7).
        alpha_init: initial gate logit log_alpha (large: gates start open).
        temperature / limit_l / limit_r: the hard-concrete temperature and stretch interval (l < 0, r > 1).
    """

    PEFT_TYPE: ClassVar[str] = "DIFF_PRUNING"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    density: float = 0.005
    l0_lambda: float = 1.25e-7
    alpha_init: float = 5.0
    temperature: float = 1.0
    limit_l: float = -1.5
    limit_r: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_density("density")
        self._check(is_number(self.l0_lambda) and self.l0_lambda >= 0, "l0_lambda", "a number >= 0")
        self._check(is_number(self.alpha_init), "alpha_init", "a number")
        self._check(is_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        self._check(is_number(self.limit_l) and self.limit_l < 0, "limit_l", "a number < 0")
        self._check(is_number(self.limit_r) and self.limit_r > 1, "limit_r", "a number > 1")
