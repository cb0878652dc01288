"""OFTConfig and BOFTConfig: field names and defaults as in Hugging Face PEFT, validated when built.

Layer-dependent constraints (a block size that must divide the layer's input width, butterfly factors
that must fit it) are checked when the adapter is attached, naming the module, the field and the width.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


NEUMANN_SERIES_VERSION = "0.18.0"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(version).partition("@")[0])[:3])


def _check_targeting(cfg: PeftConfig) -> None:
    """The target / layer-filter rules every method shares (as in PEFT)."""
    name = type(cfg).__name__
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise ConfigError(f"{name}.layers_pattern: only meaningful together with layers_to_transform")
    if isinstance(cfg.target_modules, str) and cfg.layers_to_transform is not None:
        raise ConfigError(
            f"{name}.layers_to_transform: cannot be used when target_modules is a regex string; "
            "put the layer filter into the regex"
        )


def _check_exactly_one(cfg: PeftConfig, a: str, b: str) -> None:
    """PEFT's rule: exactly one of two sizes is set (non-zero); the layer width fixes the other."""
    name = type(cfg).__name__
    va, vb = getattr(cfg, a), getattr(cfg, b)
    check_int(cfg, a, 0)
    check_int(cfg, b, 0)
    if va == 0 and vb == 0:
        raise ConfigError(
            f"{name}.{a} / {b}: expected exactly one of them > 0 (the layer width fixes the other), got both 0"
        )
    if va != 0 and vb != 0:
        raise ConfigError(
            f"{name}.{a} / {b}: expected exactly one of them > 0, got {a}={va} and {b}={vb} "
            f"({a} x {b} must equal each layer's input width; set the other to 0)"
        )


@dataclasses.dataclass
class OFTConfig(PeftConfig):
    """OFT (Qiu et al. 2023, arXiv 2306.07280): ``W' = W R^T`` with ``R`` block-diagonal orthogonal.

    Each block is the Cayley transform of a learned skew-symmetric matrix, so ``R`` starts at the identity.

    Args:
        r: number of blocks per layer (input width / block size); 0 to give ``oft_block_size`` instead.
        oft_block_size: size of each block (must divide every targeted layer's input width, c_in * k * k
            for a convolution); 0 to give ``r`` instead. Exactly one of the two is set.
        module_dropout: in training, replace this fraction of the blocks by the identity (multiplicative
            dropout of the paper).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train with the adapter: "none", "all" or "oft_only".
        exclude_modules: names or regex never to target.
        init_weights: True starts at the identity (skew parameters zero); False draws them from N(0, 0.1^2).
        layers_to_transform / layers_pattern: keep only these layer indices.
        modules_to_save: modules trained in full and saved with the adapter.
        coft: constrained OFT: keep each skew block within Frobenius radius ``eps / sqrt(blocks)`` of zero,
            i.e. ``R`` within a fixed distance of the identity (projected after every update).
        eps: COFT's radius (only used with ``coft``).
        block_share: one block shared by all positions (``b (b - 1) / 2`` parameters per layer).
        use_cayley_neumann: approximate ``(I + Q)(I - Q)^-1`` by its Neumann series instead of solving.
        num_cayley_neumann_terms: terms of that series.
    """

    PEFT_TYPE: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check = self._check
        _check_exactly_one(self, "r", "oft_block_size")
        check(self.oft_block_size != 1, "oft_block_size", "a block size >= 2 (a 1 x 1 rotation has no parameters)")
        check_probability(self, "module_dropout")
        check(self.bias in ("none", "all", "oft_only"), "bias", "'none', 'all' or 'oft_only'")
        check_number(self, "eps", above=0)
        check_bool(self, "fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann")
        check_int(self, "num_cayley_neumann_terms", 1, expected="an integer >= 1")
        _check_targeting(self)
        if self.use_cayley_neumann:
            if self.peft_version is None:
                # PEFT reads a Cayley-Neumann config only with a version (it changed the series in 0.18.0);
                # this is the series implemented here
                self.peft_version = NEUMANN_SERIES_VERSION
            elif _version_tuple(self.peft_version) < _version_tuple(NEUMANN_SERIES_VERSION):
                warnings.warn(
                    f"OFTConfig: the adapter was written by PEFT {self.peft_version}, whose Cayley-Neumann series "
                    f"differs from PEFT >= {NEUMANN_SERIES_VERSION}'s (used here); outputs will differ slightly",
                    stacklevel=3,
                )


@dataclasses.dataclass
class BOFTConfig(PeftConfig):
    """BOFT (Liu et al. 2024, arXiv 2311.06243): ``R`` a product of ``m`` butterfly factors, plus a scale.

    Factor ``i`` is ``P_i diag(R_i1 .. R_iD) P_i^T`` with Cayley-orthogonal blocks and a fixed butterfly
    permutation ``P_i``; the output is scaled by a learned vector ``s`` (one entry per output feature).

    Args:
        boft_block_size: size of each orthogonal block (0 to give ``boft_block_num`` instead).
        boft_block_num: blocks per factor (0 to give ``boft_block_size`` instead). Exactly one is set;
            size x number must equal every targeted layer's input width (c_in * k * k for a convolution).
        boft_n_butterfly_factor: number of butterfly factors m (1 is block-diagonal OFT; each further
            factor doubles the span of a block).
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as OFT.
        boft_dropout: in training, replace this fraction of one factor's blocks by the identity.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train with the adapter: "none", "all" or "boft_only".
        init_weights: True starts at the identity (R zero, s one); False draws R from N(0, 0.1^2) and s
            from N(1, 0.1^2).
    """

    PEFT_TYPE: ClassVar[str] = "BOFT"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check = self._check
        _check_exactly_one(self, "boft_block_size", "boft_block_num")
        check_int(self, "boft_n_butterfly_factor", 1, expected="an integer >= 1")
        if self.boft_n_butterfly_factor > 1:
            if self.boft_block_size % 2:
                raise ConfigError(
                    f"BOFTConfig.boft_block_size: expected an even size with boft_n_butterfly_factor > 1 "
                    f"(butterflies swap half blocks), got {self.boft_block_size}"
                )
            if self.boft_block_num and self.boft_block_num % 2 ** (self.boft_n_butterfly_factor - 1):
                raise ConfigError(
                    f"BOFTConfig.boft_block_num: expected a multiple of 2^(boft_n_butterfly_factor - 1) = "
                    f"{2 ** (self.boft_n_butterfly_factor - 1)}, got {self.boft_block_num}"
                )
        check_probability(self, "boft_dropout")
        check(self.bias in ("none", "all", "boft_only"), "bias", "'none', 'all' or 'boft_only'")
        check_bool(self, "fan_in_fan_out", "init_weights")
        _check_targeting(self)
