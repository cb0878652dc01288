"""FourierFT (Gao et al. 2024, arXiv 2405.03003): a weight update learned as a sparse spectrum.

Each targeted layer learns ``n`` spectral coefficients ``c`` at fixed random locations ``(u_k, v_k)`` of a
``d_out x d_in`` frequency grid; the update is ``dW = scaling * Re(ifft2(F))`` with ``F[u_k, v_k] = c_k``
and zero elsewhere, and ``h = W0 x + dW x``. The locations are not trained or saved: they are regenerated
from ``random_loc_seed`` exactly as Hugging Face PEFT does (the first ``n`` entries of a seeded
``randperm(d_out * d_in)``), so PEFT files load with identical outputs. The checkpoint key is
``fourierft_spectrum``, shape ``(n,)``. Linear and GPT-2 Conv1D layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_pattern
from ..layers import Adapter
from ..kernel_helpers import adapter_dtype, has_hooks, is_transposed, layer_dims
from ..targeting import LINEAR_TYPES
from ..registry import register_method
from ..targeting import pattern_value


@dataclasses.dataclass
class FourierFTConfig(PeftConfig):
    """FourierFT configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        n_frequency: learned spectral coefficients per targeted layer (at most d_in * d_out).
        scaling: multiplies the update (plays the role of LoRA's alpha; the paper uses 100-300).
        random_loc_seed: seed of the coefficients' random locations in the frequency grid.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections (GPT-2: the MLP output projection, as PEFT).
        exclude_modules: names or regex never to target.
        bias: which base biases train and are saved with the adapter: "none", "all" or "fourier_only".
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: keep only these layer indices.
        n_frequency_pattern: per-module overrides of n_frequency, keyed by regex.
        init_weights: True starts the spectrum at zero (the identity); False (PEFT's default) draws it
            from a standard normal, so the model does not start at the base.
    """

    PEFT_TYPE: ClassVar[str] = "FOURIERFT"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check = self._check
        check_int(self, "n_frequency", 1)
        check_number(self, "scaling")
        check_int(self, "random_loc_seed")
        check(self.bias in ("none", "all", "fourier_only"), "bias", "'none', 'all' or 'fourier_only'")
        check_bool(self, "init_weights")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        check_pattern(self, "n_frequency_pattern", integer=True)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError(
                "FourierFTConfig.layers_to_transform / layers_pattern: cannot be used when target_modules is a "
                "regex string; put the layer filter into the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("FourierFTConfig.layers_pattern: only meaningful together with layers_to_transform")


def spectral_locations(d_out: int, d_in: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the ``n`` learned coefficients: PEFT's seeded ``randperm`` over the flattened grid."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // d_in, flat % d_in


def fourier_delta(spectrum: Tensor, rows: Tensor, cols: Tensor, d_out: int, d_in: int, scaling: float) -> Tensor:
    """``scaling * Re(ifft2(F))`` (d_out, d_in) with ``F`` zero except ``F[rows, cols] = spectrum``.

    Computed in float32 (``ifft2`` has no half-precision kernels) and returned in the spectrum's dtype.
    """
    dense = torch.zeros(d_out, d_in, device=spectrum.device, dtype=torch.float32)
    dense = dense.index_put((rows, cols), spectrum.float())
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


def half_spectrum_positions(rows: Tensor, cols: Tensor, d_out: int, d_in: int) -> tuple[Tensor, Tensor]:
    """Where each coefficient lands in the one-sided spectrum of :func:`fourier_delta_half`.

    Returns ``(src, pos)``: coefficient ``src[j]`` adds half its value at flat position ``pos[j]`` of a
    ``d_out x (d_in // 2 + 1)`` grid. Each ``(u, v)`` goes there itself if ``v <= d_in // 2`` and as its
    mirror ``(-u, -v)`` (mod the grid) if ``-v mod d_in <= d_in // 2``: both for the columns 0 and (even
    ``d_in``) ``d_in / 2``, whose mirror stays in the half.
    """
    half = d_in // 2 + 1
    k = torch.arange(rows.numel(), device=rows.device)
    mrows, mcols = (-rows) % d_out, (-cols) % d_in
    own, mirror = cols < half, mcols < half
    src = torch.cat([k[own], k[mirror]])
    pos = torch.cat([rows[own] * half + cols[own], mrows[mirror] * half + mcols[mirror]])
    return src, pos


def fourier_delta_half(
    spectrum: Tensor, src: Tensor, pos: Tensor, d_out: int, d_in: int, scaling: float
) -> Tensor:
    """:func:`fourier_delta` through a real inverse FFT of half the size (equal up to rounding).

    The coefficients are real, so ``Re(ifft2(F)) = ifft2(H)`` with ``H = (F + F[-u, -v]) / 2`` Hermitian
    (and real); ``irfft2`` needs only its columns ``0 .. d_in // 2``, filled by ``src`` / ``pos`` from
    :func:`half_spectrum_positions`, accumulating where a coefficient meets its own or another's mirror.
    The scaling is folded into the scattered values. Computed in float32 (float64 stays float64) and
    returned in the spectrum's dtype.
    """
    half = d_in // 2 + 1
    dtype = torch.promote_types(spectrum.dtype, torch.float32)  # no half-precision FFT kernels
    values = spectrum.to(dtype).index_select(0, src) * (0.5 * scaling)
    grid = torch.zeros(d_out * half, device=spectrum.device, dtype=dtype).index_add_(0, pos, values)
    return torch.fft.irfft2(grid.view(d_out, half), s=(d_out, d_in)).to(spectrum.dtype)


@register_method(
    "fourierft",
    config=FourierFTConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="n_frequency per target",
    position="weight delta (inverse 2-D DFT of a sparse spectrum) beside each targeted layer",
    paper="arXiv 2405.03003 (FourierFT)",
    examples={"fourierft": {"n_frequency": 16, "init_weights": True}},
)
class FourierFTAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    # PEFT's defaults: LoRA's (query, value), except GPT-2's MLP output projection
    default_roles = {"gpt2": ("ffn_out",), "btlm": ("qkv", "attn_out", "ffn_out"), "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"fourierft_spectrum": "fourierft_spectrum"}

    def __init__(self, base: nn.Module, config: FourierFTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.n = n = pattern_value(config.n_frequency_pattern, key, config.n_frequency)
        if n > self.d_out * self.d_in:
            raise ValueError(
                f"{key}: n_frequency={n} exceeds the {self.d_out} x {self.d_in} = {self.d_out * self.d_in} "
                f"entries of the layer's frequency grid"
            )
        self.scaling = float(config.scaling)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        rows, cols = spectral_locations(self.d_out, self.d_in, n, config.random_loc_seed)
        # fixed, regenerated from the seed: buffers that follow the device but are never saved
        self.register_buffer("rows", rows.to(w.device), persistent=False)
        self.register_buffer("cols", cols.to(w.device), persistent=False)
        src, pos = half_spectrum_positions(rows, cols, self.d_out, self.d_in)
        self.register_buffer("half_src", src.to(w.device), persistent=False)
        self.register_buffer("half_pos", pos.to(w.device), persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.empty(n, device=w.device, dtype=dtype))
        with torch.no_grad():
            if config.init_weights or not init:
                nn.init.zeros_(self.fourierft_spectrum)
            else:
                self.fourierft_spectrum.copy_(torch.randn(n))

    @classmethod
    def param_count(cls, base: nn.Module, config: FourierFTConfig, key: str = "") -> int:
        """Closed form: n_frequency (or its pattern override) per target."""
        return pattern_value(config.n_frequency_pattern, key, config.n_frequency)

    def _delta(self) -> Tensor:
        """The update as (d_out, d_in), PEFT's route (merges are bit for bit PEFT's)."""
        return fourier_delta(self.fourierft_spectrum, self.rows, self.cols, self.d_out, self.d_in, self.scaling)

    def _fast_delta(self) -> Tensor:
        """The same through the half-size real inverse FFT (forward passes)."""
        return fourier_delta_half(
            self.fourierft_spectrum, self.half_src, self.half_pos, self.d_out, self.d_in, self.scaling
        )

    def delta_weight(self, base: nn.Module) -> Tensor:
        """The update in the base weight's layout ((d_in, d_out) for Conv1D)."""
        delta = self._delta()
        return delta.t() if self.transposed else delta

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """A plain Linear / Conv1D base: one GEMM with ``W0 + dW`` instead of a base and a delta product (one
        GEMM fewer forward and backward, no (tokens x d_out) temporaries); declines for hooks, autocast and
        mixed dtypes (the generic path)."""
        if type(base) not in LINEAR_TYPES or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        w = base.weight
        if x.dtype != w.dtype or self.fourierft_spectrum.dtype != w.dtype:
            return None
        x2d = x.reshape(-1, x.shape[-1])
        out = F.linear(x2d, (w.t() if self.transposed else w) + self._fast_delta(), base.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        delta = self._fast_delta()
        return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)
