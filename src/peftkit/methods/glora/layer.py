"""GLoRA (Chavan et al. 2023, arXiv 2306.07967): generalized LoRA on Linear and GPT-2 Conv1D layers.

The paper's unified formulation re-parametrizes a frozen layer ``f(x) = W0 x + b0`` as

    f(x) = (W0 + W0 A + B) x + C W0 + D b0 + E + b0

with five trainable supports: A (scales the weight), B (shifts the weight), C (couples the weight into the
bias), D (scales the bias) and E (shifts the bias); each is a low-rank product, a vector, a scalar or absent,
and the paper searches over these choices per layer (evolutionary search over a supernet).

As Hugging Face PEFT (0.21), whose files and numbers this module matches, there is no search: one setting for
A and B, one for C and one for D and E applies to every adapted layer, and the products are element-wise:

    W = W0 + W0 * A + B                      A, B: (d_out, d_in) as Xd Xu with Xd (d_out, r), Xu (r, d_in);
                                             or a column (d_out, 1); or a scalar
    b = b0 + b0 * D + E + W0 C               C: (d_in, 1) as Xd Xu with Xd (d_in, r), Xu (r, 1), or a column
                                             (d_in, 1); D, E: (d_out,) or a scalar

(the paper writes ``C W0``; PEFT's ``W0 @ C`` gives the (d_out,) bias the layer needs). On a layer without
a bias, C, D and E are off. An off path holds no parameter; PEFT still writes it to the file as a zero buffer
``glora_<X>.zeros`` ((d_out, d_in) for A / B, (d_in, 1) for C, (d_out,) for D / E), and so does peftkit
(the keys load both ways; their values are ignored on load). Other file keys: ``glora_<X>.Xd`` /
``glora_<X>.Xu`` (lora), ``glora_<X>.X`` (vector, constant).

The merge is not additive (``W0 * A`` depends on the base), so it is ``merge`` / ``unmerge``:
``W <- W0 + (W0 * A + B)``, ``b <- b0 + (b0 * D + E + W0 C)``; unmerge ``W0 = (W - B) / (1 + A)``,
``b0 = (b - E - W0 C) / (1 + D)`` (the wrapper makes it bit-exact). Differences from PEFT: GPT-2's Conv1D is
supported (PEFT wraps plain ``nn.Linear`` only; the parameters are laid out as for the equivalent Linear);
several GLoRA adapters merged into one layer compose one after the other (each sees the weight the previous
merges left), where PEFT re-merges all of them against the original ``W0``; the unmerged forward of several
active adapters is additive against ``W0`` in both libraries, so merged and unmerged outputs agree for one
merged adapter per layer (the usual case), not for several.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as GF
from .config import GloraConfig

LETTERS = ("A", "B", "C", "D", "E")


def path_kinds(config: GloraConfig, has_bias: bool) -> dict[str, str]:
    """The path of each support on a layer (bias paths are off on a bias-free layer, as PEFT)."""
    return {
        "A": config.config_A_B, "B": config.config_A_B,
        "C": config.config_C if has_bias else "none",
        "D": config.config_D_E if has_bias else "none", "E": config.config_D_E if has_bias else "none",
    }


def path_shapes(letter: str, kind: str, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, ...]]:
    """File-key stem (``Xd``, ``Xu``, ``X`` or ``zeros``) -> shape of one support's tensors (PEFT's layout)."""
    rows = d_in if letter == "C" else d_out  # C multiplies W0 from the right: a (d_in, 1) column
    if kind == "lora":
        return {"Xd": (rows, r), "Xu": (r, 1 if letter == "C" else d_in)}
    if kind == "vector":
        return {"X": (rows, 1) if letter in "ABC" else (rows,)}
    if kind == "constant":
        return {"X": (1,)}
    return {"zeros": {"A": (d_out, d_in), "B": (d_out, d_in), "C": (d_in, 1)}.get(letter, (d_out,))}


@register_method(
    "glora",
    config=GloraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="A, B: 2 r (d_in + d_out) (lora) / 2 d_out (vector) / 2 (constant); with a bias also "
                  "C: r (d_in + 1) / d_in and D, E: 2 d_out / 2, per target",
    position="weight W0 + W0*A + B and bias b0 + b0*D + E + W0 C of each targeted layer",
    paper="arXiv 2306.07967 (GLoRA)",
    examples={"glora": {"r": 2, "config_D_E": "none"}},  # D: no gradient on the tiny models' zero biases
)
class GloraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's GLoRA defaults are its LoRA defaults
    merged_params = ("weight", "bias")

    def __init__(self, base: nn.Module, config: GloraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.has_bias = getattr(base, "bias", None) is not None
        self.r = config.r
        self.kinds = path_kinds(config, self.has_bias)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self._keys: dict[str, str] = {}
        self._zero_shapes: dict[str, tuple[int, ...]] = {}
        self._zero_dtype = dtype
        for letter, kind in self.kinds.items():
            for stem, shape in path_shapes(letter, kind, self.d_out, self.d_in, self.r).items():
                attr = f"glora_{letter}_{stem}"
                self._keys[attr] = f"glora_{letter}.{stem}"
                if stem == "zeros":
                    self._zero_shapes[attr] = shape
                else:
                    self.register_parameter(attr, nn.Parameter(torch.zeros(shape, device=w.device, dtype=dtype)))
        self._wc: Tensor | None = None  # W0 C at the last bias merge (its unmerge subtracts the same)
        if init:
            with torch.no_grad():
                self._init_weights(config.init_weights)

    def __getattr__(self, name: str) -> Any:
        zeros = self.__dict__.get("_zero_shapes")
        if zeros is not None and name in zeros:  # an off path: PEFT's zero buffer, made when the file asks
            ref = next(iter(self._parameters.values()), None)
            device = ref.device if ref is not None and not ref.is_meta else None
            return torch.zeros(zeros[name], dtype=self._zero_dtype, device=device)
        return super().__getattr__(name)

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        return dict(self._keys)

    def _init_weights(self, init_weights: bool) -> None:
        """PEFT's initialisation: lora ``Xu`` Kaiming uniform, ``Xd`` zero (random with init_weights=False);
        vectors and constants zero (Kaiming uniform / N(0, 0.02) with init_weights=False)."""
        for letter, kind in self.kinds.items():
            if kind == "lora":
                nn.init.kaiming_uniform_(getattr(self, f"glora_{letter}_Xu"), a=math.sqrt(5))
                xd = getattr(self, f"glora_{letter}_Xd")
                nn.init.zeros_(xd) if init_weights else nn.init.kaiming_uniform_(xd, a=math.sqrt(5))
            elif kind in ("vector", "constant") and not init_weights:
                x = getattr(self, f"glora_{letter}_X")
                if kind == "constant":
                    nn.init.normal_(x, mean=0.0, std=0.02)
                else:
                    nn.init.kaiming_uniform_(x.unsqueeze(0) if x.dim() == 1 else x, a=math.sqrt(5))

    @classmethod
    def param_count(cls, base: nn.Module, config: GloraConfig, key: str = "") -> int:
        """Closed form from the layer's shape and the paths (off paths hold no parameter)."""
        d_out, d_in = layer_dims(base)
        kinds = path_kinds(config, getattr(base, "bias", None) is not None)
        return sum(
            math.prod(shape)
            for letter, kind in kinds.items() if kind != "none"
            for shape in path_shapes(letter, kind, d_out, d_in, config.r).values()
        )

    # -- the supports -----------------------------------------------------------------------------------
    def path(self, letter: str) -> Tensor | None:
        """One support's value, broadcastable to its target (see ``functional``), or None when off."""
        kind = self.kinds[letter]
        if kind == "lora":
            return getattr(self, f"glora_{letter}_Xd") @ getattr(self, f"glora_{letter}_Xu")
        if kind == "vector":
            return getattr(self, f"glora_{letter}_X")
        if kind == "constant":
            return getattr(self, f"glora_{letter}_X")[0]
        return None

    def _w0(self, base: nn.Module, dtype: torch.dtype) -> Tensor:
        """The base weight as (d_out, d_in) in ``dtype``."""
        w = base.weight
        return (w.t() if self.transposed else w).to(dtype)

    def _deltas(self, base: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """(``W0 * A + B``, ``b0 * D + E + W0 C``) in the adapter's dtype; None for a part that is off."""
        ref = next(iter(self._parameters.values()), None)
        dtype = ref.dtype if ref is not None else self._zero_dtype
        w0 = self._w0(base, dtype)
        dw = GF.weight_delta(w0, self.path("A"), self.path("B"))
        db = None
        if self.has_bias:
            db = GF.bias_delta(w0, base.bias.to(dtype), self.path("C"), self.path("D"), self.path("E"))
        return dw, db

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        dw, db = self._deltas(base)
        if dw is None and db is None:
            return out
        if dw is None:
            return out + db.to(out.dtype)
        y = F.linear(x.to(dw.dtype), dw, db)
        return out + y.to(out.dtype)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """A plain Linear / Conv1D base: one GEMM with the effective weight and bias (PEFT's own forward)."""
        if type(base) not in LINEAR_TYPES or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        ref = next(iter(self._parameters.values()), None)
        w = base.weight
        if ref is None or x.dtype != w.dtype or ref.dtype != w.dtype:
            return None
        w0 = self._w0(base, w.dtype)
        dw, db = self._deltas(base)
        weight = w0 if dw is None else w0 + dw
        bias = base.bias
        if db is not None:
            bias = bias + db
        return F.linear(x, weight, bias)

    # -- merge ------------------------------------------------------------------------------------------
    def _natural(self, weight: Tensor) -> Tensor:
        return weight.t() if self.transposed else weight

    def _paths_as(self, like: Tensor, *letters: str) -> list[Tensor | None]:
        return [None if (p := self.path(k)) is None else p.to(like.dtype) for k in letters]

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        a, b = self._paths_as(weight, "A", "B")
        merged = GF.merge_weight(self._natural(weight), a, b)
        return (merged.t() if self.transposed else merged).contiguous(), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        a, b = self._paths_as(weight, "A", "B")
        w0 = GF.unmerge_weight(self._natural(weight), a, b)
        return (w0.t() if self.transposed else w0).contiguous()

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """The merged bias ``b0 + (b0 * D + E + W0 C)``; ``base.weight`` is still ``W0`` here (the wrapper
        computes every merged parameter before writing any)."""
        if name != "bias":
            raise NotImplementedError(name)
        c, d, e = self._paths_as(value, "C", "D", "E")
        w0 = self._w0(base, value.dtype)
        self._wc = None if c is None else (w0 @ c).squeeze(-1).detach()
        return GF.merge_bias(value, GF.bias_delta(w0, value, c, d, e))

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        if name != "bias":
            raise NotImplementedError(name)
        _, d, e = self._paths_as(value, "C", "D", "E")
        return GF.unmerge_bias(value, d, e, self._wc)
