"""PsoftConfig: field names and defaults as in Hugging Face PEFT, validated when built (with PEFT's warnings)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability

_NITER_DEFAULT = 10
_TERMS_DEFAULT = 5


@dataclasses.dataclass
class PsoftConfig(PeftConfig):
    """PSOFT (efficient orthogonal fine-tuning with principal subspace adaptation, arXiv 2505.11235).

    Args:
        r: rank of the principal subspace; ``R`` is r x r (r <= min(d_in, d_out) of every target).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        exclude_modules: names or regex never to target.
        psoft_alpha: scale numerator, ``s = psoft_alpha / r`` (as LoRA's alpha).
        psoft_dropout: dropout on the adapter branch's input.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        ab_svd_init: "psoft_init" (``A`` the top right singular vectors, row-orthonormal; ``B`` = U S / s) or
            "pissa_init" (the singular values split symmetrically, PiSSA's way).
        psoft_svd: "full" (torch.linalg.svd) or "lowrank" (torch.svd_lowrank, seeded with random_seed).
        psoft_svd_lowrank_niter: power iterations of the low-rank SVD.
        random_seed: seed of the low-rank SVD's random projection (so a file reloads to the same A and B).
        psoft_orth: ``R`` orthogonal (Cayley of a skew-symmetric ``Q``); False: ``R`` a free r x r matrix.
        psoft_mag_b / psoft_mag_a: learned scales on R's output / input side.
        use_cayley_neumann / num_cayley_neumann_terms / cayley_neumann_eps: the Neumann-series Cayley transform.
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True: ``R = I`` (the model starts at the base); False: a random ``Q`` (std 0.1).
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "PSOFT"

    r: int = 32
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    psoft_alpha: int = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = _NITER_DEFAULT
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = _TERMS_DEFAULT
    cayley_neumann_eps: float | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_int(self, "r", 1)
        check_number(self, "psoft_alpha", above=0)
        check_probability(self, "psoft_dropout")
        check_bool(self, "fan_in_fan_out", "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann",
                   "init_weights")
        self._check(self.ab_svd_init in ("psoft_init", "pissa_init"), "ab_svd_init", "'psoft_init' or 'pissa_init'")
        self._check(self.psoft_svd in ("full", "lowrank"), "psoft_svd", "'full' or 'lowrank'")
        check_int(self, "psoft_svd_lowrank_niter", 0)
        check_int(self, "random_seed")
        check_int(self, "num_cayley_neumann_terms")
        if self.cayley_neumann_eps is not None:
            check_number(self, "cayley_neumann_eps")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"{name}.layers_to_transform: cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError(f"{name}.layers_pattern: cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}.layers_pattern: only meaningful together with layers_to_transform")
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != _NITER_DEFAULT:
            warnings.warn(f"{name}.psoft_svd_lowrank_niter={self.psoft_svd_lowrank_niter} is only used with "
                          f"psoft_svd='lowrank' (got {self.psoft_svd!r}): ignored", UserWarning, stacklevel=3)
        if self.use_cayley_neumann:
            self._check(self.num_cayley_neumann_terms > 0, "num_cayley_neumann_terms", "an integer > 0")
            eps = self.cayley_neumann_eps
            self._check(eps is None or 0.0 < eps < 1.0, "cayley_neumann_eps", "None or a number in (0, 1)")
        else:
            if self.num_cayley_neumann_terms != _TERMS_DEFAULT:
                warnings.warn(f"{name}.num_cayley_neumann_terms={self.num_cayley_neumann_terms} is only used with "
                              "use_cayley_neumann=True: ignored", UserWarning, stacklevel=3)
            if self.cayley_neumann_eps is not None:
                warnings.warn(f"{name}.cayley_neumann_eps={self.cayley_neumann_eps} is only used with "
                              "use_cayley_neumann=True: ignored", UserWarning, stacklevel=3)
