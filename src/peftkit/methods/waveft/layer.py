"""WaveFT (Bilican et al. 2025, arXiv 2505.12532): a weight update learned as sparse wavelet coefficients.

Each targeted layer (``W0``: ``d_out x d_in``, frozen) learns ``n`` coefficients ``c`` (``waveft_spectrum``,
shape ``(n,)``, the only trained tensor) at fixed random positions of a wavelet-coefficient matrix ``S``; the
update is their one-level inverse 2-D discrete wavelet transform:

    h = W0 x + dW x,    dW = scaling * IDWT2(S),    S[u_k, v_k] = c_k, zero elsewhere

``S`` is split into the four sub-bands of one level, ``S = [[A, H], [V, D]]`` (approximation and horizontal,
vertical, diagonal details), so ``dW`` is the sum of one separable ``L x L`` filter patch per coefficient (``L``:
the wavelet's filter length; Haar, ``db1``, the default: 2x2). Following Hugging Face PEFT (the authors'
implementation), ``S`` is first padded by ``L - 2`` (rounded up to even) around the ``d_out x d_in`` grid of
positions, so that the reconstruction covers the layer, and the result is centre-cropped to ``d_out x d_in``.
``use_idwt=False`` skips the transform (``dW[u_k, v_k] = scaling c_k``, a sparse update).

The positions are not trained or saved: they are regenerated from ``random_loc_seed`` exactly as PEFT does
(the first ``n`` entries of a seeded ``randperm(d_out * d_in)``), so files load both ways with the same
outputs. ``init_weights=True`` starts ``c`` at zero (the model starts at the base); False draws
``0.01 x`` standard normal. Merging adds ``dW``. Linear and GPT-2 Conv1D layers.

The wavelet filters come from PyWavelets (the optional extra ``peftkit[wavelets]``); PEFT ships its own copy
of PyWavelets' tables. Differences from PEFT: its copies of ``coif4`` and ``coif5`` are not PyWavelets'
filters (their low-pass taps do not sum to ``sqrt 2``), so those two families give other (PyWavelets')
updates here; the families PEFT's config accepts but its table lacks (db11-db38, sym11-sym20, coif6-coif17)
work here where PEFT fails at the first forward. The paper's update is the same transform; the padding and
crop are PEFT's.

Instead of PEFT's dense padded spectrum and stride-2 transposed convolution over the whole grid, the update is
a scatter of ``n L^2`` weighted values (``functional.scatter_delta``), and a plain layer runs one GEMM with
``W0 + dW`` (``fused_forward``) instead of a base and a delta product.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter, AdapterLayer
from ...registry import register_method
from ...targeting import LINEAR_TYPES, find_targets, pattern_value
from . import functional as WF
from .config import WaveFTConfig

_ALLOCATION = "_waveft_allocation"  # config attribute (not a field: never saved): path -> proportional n


@register_method(
    "waveft",
    config=WaveFTConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="n_frequency per target",
    position="weight delta (inverse 2-D wavelet transform of sparse coefficients) beside each targeted layer",
    paper="arXiv 2505.12532 (WaveFT)",
    examples={"waveft": {"n_frequency": 24, "scaling": 5.0, "wavelet_family": "db2"}},
)
class WaveFTAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    # PEFT's table: LoRA's (query, value), except GPT-2 / GPT-BigCode's MLP output projection
    default_roles = {"gpt2": ("ffn_out",), "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"waveft_spectrum": "waveft_spectrum"}

    def __init__(self, base: nn.Module, config: WaveFTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"{key}: WaveFT wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.n = n = self.n_frequency(config, key)
        if n > self.d_out * self.d_in:
            raise ValueError(
                f"{key}: WaveFTConfig.n_frequency={n} exceeds the {self.d_out} x {self.d_in} = "
                f"{self.d_out * self.d_in} positions of the layer; allowed: 1 .. {self.d_out * self.d_in}"
            )
        filters = WF.wavelet_filters(config.wavelet_family) if config.use_idwt else None  # ImportError here
        self.scaling = float(config.scaling)
        w = base.weight
        rows, cols = WF.coefficient_positions(self.d_out, self.d_in, n, config.random_loc_seed)
        pos, weight = WF.patches(rows, cols, self.d_out, self.d_in, filters, transposed=self.transposed)
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        device = w.device
        # fixed, regenerated from the seed: buffers that follow the device but are never saved
        self.register_buffer("pos", pos.to(device), persistent=False)
        self.register_buffer("patch_weight", weight.to(device=device, dtype=torch.float32), persistent=False)
        self.waveft_spectrum = nn.Parameter(torch.empty(n, device=w.device, dtype=dtype))
        with torch.no_grad():
            if config.init_weights or not init:
                nn.init.zeros_(self.waveft_spectrum)
            else:
                self.waveft_spectrum.copy_(torch.randn(n) * 0.01)

    # -- how many coefficients ---------------------------------------------------------------------------
    @staticmethod
    def n_frequency(config: WaveFTConfig, key: str) -> int:
        """The layer's ``n``: its proportional share (``proportional_parameters``), else the first
        ``n_frequency_pattern`` match, else ``n_frequency`` (PEFT's order)."""
        if config.proportional_parameters:
            share = getattr(config, _ALLOCATION, {}).get(key)
            if share is not None:
                return share
        return int(pattern_value(config.n_frequency_pattern, key, config.n_frequency))

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        """The config's targets; with ``proportional_parameters`` also each one's share of the budget, kept on
        the config (not a field, never saved: a loaded config recomputes it from the same targets)."""
        paths = find_targets(model, named, config, cls.default_roles, cls.supported_layers)
        if config.proportional_parameters and paths:
            modules = dict(named)
            dims = {}
            for path in paths:
                module = modules[path] if path in modules else model.get_submodule(path)
                if isinstance(module, AdapterLayer):
                    module = module.base_layer
                dims[path] = layer_dims(module)
            object.__setattr__(config, _ALLOCATION, WF.proportional_allocation(dims, config.n_frequency))
        return paths

    @classmethod
    def param_count(cls, base: nn.Module, config: WaveFTConfig, key: str = "") -> int:
        """Closed form: ``n`` per target (``n_frequency``, its pattern override, or the proportional share
        ``max(1, round(n_frequency T d_in d_out / sum of d_in d_out))`` over the ``T`` targets)."""
        return cls.n_frequency(config, key)

    # -- the update --------------------------------------------------------------------------------------
    def _delta(self) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        shape = (self.d_in, self.d_out) if self.transposed else (self.d_out, self.d_in)
        return WF.scatter_delta(self.waveft_spectrum, self.pos, self.patch_weight, shape, self.scaling)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self._delta()

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """A plain Linear / Conv1D base: one GEMM with ``W0 + dW`` instead of a base and a delta product (one
        GEMM fewer forward, two fewer backward); declines for hooks, autocast and mixed dtypes."""
        if type(base) not in LINEAR_TYPES or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        w = base.weight
        if x.dtype != w.dtype or self.waveft_spectrum.dtype != w.dtype:
            return None
        x2d = x.reshape(-1, x.shape[-1])
        weight = w + self._delta()
        if self.transposed:  # Conv1D: out = b + x W, W stored (d_in, d_out)
            out = torch.addmm(base.bias, x2d, weight) if base.bias is not None else x2d @ weight
        else:
            out = F.linear(x2d, weight, base.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        delta = self._delta()
        xd = x.to(delta.dtype)
        y = xd @ delta if self.transposed else F.linear(xd, delta)
        return out + y.to(out.dtype)
