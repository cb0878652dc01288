"""AdaMSS (adaptive multi-subspaces, OpenReview 8ZdWmpYxT0) on Linear and GPT-2 Conv1D layers.

The pre-trained weight with its bias as an extra column, ``W' = [W | b]`` (d_out, d_in + 1), is split by its
randomized top-R SVD ``W' ~ U S V^T``; the output channels (rows of ``U`` (d_out, R)) are clustered by KMeans
into K subspaces ``S_k``. Subspace k trains a rank-r_k update of its own rows in the frozen basis ``V^T``:

    h = W x + b + scatter_k( B_k A_k V^T [x; 1] ),    A_k (r_k, R),  B_k (|S_k|, r_k)

``A_k`` starts at the orthonormal basis of ``U_{S_k}^T P_k`` (``P_k`` the top r_k eigenvectors of the
subspace's Gram matrix ``U_{S_k} U_{S_k}^T``), ``B_k`` at zero, so the model starts at the base. Trained:
every ``A_k`` and ``B_k`` (``K r_k R + r_k d_out`` when every cluster has at least r_k rows); frozen: ``W``,
``b``, ``V^T`` (R, d_in + 1). With ASA (``use_asa``) whole subspaces stop training during the warm-up window by
their importance (``asa.py``; ``PeftModel.update_and_allocate(step)`` as AdaLoRA's schedule).

The forward never forms a dense update: ``M = [A_1; ...; A_K] V^T`` (sum r_k, d_in + 1) and the block matrix
``B`` (d_out, sum r_k) holding each ``B_k`` at its cluster's rows are built per call, and the layer computes
``W x + b + B (M x + m)`` through LoRA's fused kernel (``m``, M's bias column, folds into the bias ``b + B m``).
PEFT projects every token onto all R basis vectors, loops over the subspaces and scatters a zero
(tokens x d_out) tensor; the two agree to float rounding.

File keys as Hugging Face PEFT: ``adamss_A.<k>``, ``adamss_B.<k>`` and the basis ``adamss_newB`` (R, d_in [+ 1]).
The clusters are not saved: they are rebuilt from the base weight on load (seeded SVD, seeded KMeans), so a
file loads onto the base it was trained on. Merging adds the weight columns of the dense update to the
weight and its last column to the bias. Unlike PEFT (0.21, nn.Linear only), GPT-2's Conv1D is wrapped too
(the SVD of the equivalent nn.Linear's ``[W | b]``, the delta transposed into the base layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from ..lora.kernels import LoraLinear
from . import asa
from . import functional as AF
from .config import AdamssConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


def _dims(base: nn.Module) -> tuple[int, int, int]:
    """(d_out, d_in, R's bound d_in + 1 with a bias, d_in without)."""
    d_out, d_in = layer_dims(base)
    return d_out, d_in, d_in + (getattr(base, "bias", None) is not None)


@register_method(
    "adamss",
    config=AdamssConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="K r_k R + r_k d_out per target (A_k (r_k, R), B_k (|S_k|, r_k)); the SVD basis V^T frozen",
    position="weight delta B_k A_k V^T per output-channel cluster beside each targeted layer",
    paper="OpenReview 8ZdWmpYxT0 (AdaMSS)",
    examples={"adamss": {"r": 8, "num_subspaces": 3}},
)
class AdamssAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ("query", "value")  # PEFT's AdaMSS defaults are its LoRA defaults (ViT: query, value)
    merged_params = ("weight", "bias")  # the update's last column folds into the bias (absent: skipped)

    def __init__(self, base: nn.Module, config: AdamssConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: AdaMSS wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__} "
                            "(target_modules: allowed are Linear / Conv1D modules)")
        if torch.empty(0).is_meta:  # a build on the meta device (loading): the clusters need the real weight
            raise RuntimeError("AdaMSS rebuilds its subspaces from the base weight; not on the meta device")
        self.d_out, self.d_in, _ = _dims(base)
        self.transposed = is_transposed(base)
        self.has_bias = getattr(base, "bias", None) is not None
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        if w.is_meta:  # a model without weights (parameter counts): placeholder clusters, equal row blocks
            self._build(*AF.placeholder_layout(self.d_out, _dims(base)[2], config), w.device, dtype)
            return
        with torch.no_grad():
            weight = w if w.is_floating_point() else dequantize_weight(base)
            weight = weight.t() if self.transposed else weight
            full = AF.weight_with_bias(weight, base.bias if self.has_bias else None)
            u, new_b = AF.principal_basis(full, config.r, config.random_seed)
            clusters = AF.cluster_rows(u, config.num_subspaces, f"{key} (num_subspaces)")
            if init:  # PEFT's random draws, in its order, on the global RNG
                factors = AF.init_subspaces(u, clusters, config.subspace_rank, config.use_dynamic_rank,
                                            config.svd_threshold, config.init_weights == "orthogonal",
                                            w.dtype if w.is_floating_point() else dtype)
            else:  # loading: only the shapes (the global RNG is left as it was)
                with torch.random.fork_rng(**AF.fork_kwargs(u.device)):
                    ranks = [AF.subspace_rank(u[rows], config.subspace_rank, config.use_dynamic_rank,
                                              config.svd_threshold) for rows in clusters]
                factors = [(torch.empty(r, u.shape[1], device=w.device), torch.empty(rows.numel(), r, device=w.device))
                           for r, rows in zip(ranks, clusters)]
        self._build(new_b, clusters, factors, w.device, dtype)

    def _build(self, new_b: Tensor, clusters: list[Tensor], factors: list[tuple[Tensor, Tensor]],
               device: torch.device, dtype: torch.dtype) -> None:
        """Register the basis V^T, the factors (A_k, B_k) and the cluster layout, with their file keys."""
        self.num_subspaces = len(clusters)
        self.rank = new_b.shape[0]
        self.sizes = [rows.numel() for rows in clusters]
        self.ranks = [a.shape[0] for a, _ in factors]
        self.checkpoint_keys = {}  # per layer: one A and one B per subspace (PEFT's order: every A, every B)
        for k, (a, b) in enumerate(factors):
            setattr(self, f"adamss_A_{k}", nn.Parameter(a.to(dtype)))
            setattr(self, f"adamss_B_{k}", nn.Parameter(b.to(dtype)))
        for k in range(self.num_subspaces):
            self.checkpoint_keys[f"adamss_A_{k}"] = f"adamss_A.{k}"
        for k in range(self.num_subspaces):
            self.checkpoint_keys[f"adamss_B_{k}"] = f"adamss_B.{k}"
        self.checkpoint_keys["adamss_newB"] = "adamss_newB"
        self.register_buffer("adamss_newB", new_b.to(dtype))  # V^T (R, d_in [+ 1]), frozen
        self.register_buffer("scatter_index", torch.cat(clusters).to(device), persistent=False)
        positions, self.total_rank = AF.b_positions(clusters, self.ranks)
        self.register_buffer("b_positions", positions.to(device), persistent=False)
        self.importance = asa.Importance(2 * self.num_subspaces)  # ASA's moving averages (used with use_asa)

    @classmethod
    def param_count(cls, base: nn.Module, config: AdamssConfig, key: str = "") -> int:
        """Closed form: ``K r_k R + r_k d_out`` with ``R = min(r, d_out, d_in [+ 1])``, ``K = min(num_subspaces,
        d_out)``, ``r_k = subspace_rank``. Exact for ``subspace_rank=1``; otherwise it assumes every cluster has
        at least r_k rows (and, with ``use_dynamic_rank``, is the upper bound), since the clusters come from data."""
        d_out, _, bound = _dims(base)
        rank, k, rk = min(config.r, d_out, bound), min(config.num_subspaces, d_out), config.subspace_rank
        return k * rk * rank + rk * d_out

    # -- the factors -----------------------------------------------------------------------------------------
    def a_factors(self) -> list[Tensor]:
        return [getattr(self, f"adamss_A_{k}") for k in range(self.num_subspaces)]

    def b_factors(self) -> list[Tensor]:
        return [getattr(self, f"adamss_B_{k}") for k in range(self.num_subspaces)]

    def factors(self) -> list[Tensor]:
        """A_1, B_1, A_2, B_2, ... (ASA's order)."""
        return [t for k in range(self.num_subspaces) for t in (getattr(self, f"adamss_A_{k}"),
                                                              getattr(self, f"adamss_B_{k}"))]

    def clusters(self) -> list[Tensor]:
        return list(torch.split(self.scatter_index, self.sizes))

    def set_subspace_trainable(self, k: int, trainable: bool) -> None:
        """ASA's decision for subspace k: its factors train or are frozen (a frozen one loses its gradient)."""
        for p in (getattr(self, f"adamss_A_{k}"), getattr(self, f"adamss_B_{k}")):
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """``M`` (sum r_k, d_in [+ 1]) and the block ``B`` (d_out, sum r_k)."""
        m = AF.stacked_projection(self.a_factors(), self.adamss_newB)
        b = AF.block_B(self.b_factors(), self.b_positions, self.d_out, self.total_rank)
        return m, b

    # -- math --------------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and update in one pass on a plain Linear / Conv1D: LoRA's kernel with ``A = M[:, :d_in]``, the
        block ``B`` and the bias ``b + B m``; the update accumulates into the fresh base output and its input
        gradient into the base one (no (tokens x d_out) temporaries, no (tokens x R) projection)."""
        transposed = type(base) is not nn.Linear
        if type(base) not in LINEAR_TYPES or transposed != self.transposed:
            return None
        w, newb = base.weight, self.adamss_newB
        if x.dtype != w.dtype or newb.dtype != w.dtype or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        m, b = self._stacked()
        bias = base.bias + b @ m[:, self.d_in] if self.has_bias else None
        x2d = x.reshape(-1, self.d_in)
        out = LoraLinear.apply(x2d, None, w, bias, m[:, : self.d_in], b, 1.0, transposed)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        m, b = self._stacked()
        return out + AF.adamss_apply(x.to(m.dtype), m, b, self.d_in).to(out.dtype)

    def _dense(self) -> Tensor:
        return AF.adamss_delta(self.a_factors(), self.b_factors(), self.adamss_newB, self.clusters(), self.d_out)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """The weight columns of the dense update, in the base weight's layout ((d_in, d_out) for Conv1D)."""
        delta = self._dense()[:, : self.d_in]
        return delta.t() if self.transposed else delta

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return value + self._dense()[:, self.d_in].to(value.dtype)  # the bias column

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return value - self._dense()[:, self.d_in].to(value.dtype)

    # -- ASA: the training-loop hook ------------------------------------------------------------------------
    @classmethod
    def on_step(cls, tuner: Any, adapter_name: str, global_step: int) -> None:
        """``update_and_allocate(step)``: with ``use_asa``, importance update and subspace pruning (``asa.py``)."""
        config = tuner.peft_config[adapter_name]
        if not config.use_asa:
            return
        adapters = [a for _, a in tuner.adapters(adapter_name)]
        total = tuner.hook_state.setdefault(adapter_name, sum(a.num_subspaces for a in adapters))
        asa.on_step(adapters, config, global_step, total)
