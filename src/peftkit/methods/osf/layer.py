"""OSF (Nayak et al. 2025, arXiv 2504.07097): orthogonal subspace fine-tuning for continual learning.

Each target weight is split by its singular value decomposition at the preserved ("effective") rank k:

    W = U_high diag(S_high) V_high + U_low diag(S_low) V_low

``U_high`` (d_out, k), ``S_high`` (k,), ``V_high`` (k, d_in) -- the top-k directions, which carry what earlier
tasks learned -- stay frozen; ``U_low`` (d_out, r), ``S_low`` (r,), ``V_low`` (r, d_in), r = min(d_out, d_in) - k,
train. The adapted weight is ``W_high + U_low diag(S_low) V_low``, applied to the frozen base as

    dW = U_low diag(S_low) V_low - U0 diag(S0) V0      (U0, S0, V0: the low components at creation, frozen)

and the gradients of ``U_low`` and ``V_low`` are projected onto the orthogonal complement of the frozen
subspace, ``dU <- (I - U_high U_high^T) dU`` and ``dV <- dV (I - V_high^T V_high)``, so updates never move the
preserved directions. Where a factor is square (``U`` when d_out <= d_in, ``V`` when d_out >= d_in) the
complement is spanned by ``U0`` / ``V0`` and the projection is ``U0 U0^T dU`` / ``dV V0^T V0``; otherwise
``U_high`` / ``V_high`` are kept for it (PEFT's choice of buffers, same numbers).

This follows Hugging Face PEFT (its file keys and numbers): ``osf_svd_params.U_low`` / ``S_low`` / ``V_low``
are saved; the frozen parts are not: they are recomputed from the base weight's SVD (float32) when the adapter
is created or loaded, so a file must be loaded onto the weights it was trained on. ``effective_rank`` None is
``min(d_out, d_in) // 2``, a float in (0, 1] a fraction of it; ``rank_pattern`` keys are searched in the module
path (``re.search``, first match). Default targets are PEFT's OSF table (every attention and MLP projection of
the architecture), every linear layer on architectures it lacks. Differences from PEFT: the projection runs
inside autograd on the parameters' uses in the adapter (PEFT hooks the parameters themselves; the same for
every loss computed through the model); unmerge restores the base bit for bit (PEFT refuses it); GPT-2's
Conv1D is wrapped too (PEFT 0.21 wraps nothing there), its factors laid out as for the equivalent nn.Linear;
on half-precision bases the adapter's tensors are float32 (peftkit's adapter dtype rule). On many tokens the
forward runs one GEMM with ``W + dW`` (formed per call, ``d_out d_in r`` work independent of the tokens);
on few tokens, PEFT's rank-2r product.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight
from ...registry import register_method
from . import functional as OF
from .config import OSFConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES
# Hugging Face PEFT's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING (model type -> module names);
# other architectures get every linear layer
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
PEFT_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2",
                                "qwen3", "phi")},
    "gpt2": ["c_attn", "c_proj"], "gpt_bigcode": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"], "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
}


def effective_rank(config: OSFConfig, key: str, min_dim: int) -> int:
    """The preserved rank of the layer at path ``key``: the first ``rank_pattern`` regex found in it, else
    ``effective_rank`` (PEFT's resolution, see ``functional.resolve_rank``)."""
    value = config.effective_rank
    for pattern, rank in (config.rank_pattern or {}).items():
        if re.search(pattern, key):
            value = rank
            break
    return OF.resolve_rank(value, min_dim)


@register_method(
    "osf",
    config=OSFConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out + 1) per target, r = min(d_in, d_out) - effective_rank (top-k SVD frozen)",
    position="the low singular components U_low diag(S_low) V_low of each targeted weight, gradients projected "
    "off the frozen top-k singular subspace",
    paper="arXiv 2504.07097 (OSF)",
    # the attention query / value projections of every family: PEFT's default (every linear layer outside its
    # table) would cost seconds of SVDs per build on the real-size MiniLM, for each contract case
    examples={"osf": {"effective_rank": 0.5,
                      "target_modules": r".*\.(q_proj|v_proj|query|value|q|v|to_q|to_v|c_attn)"}},
)
class OSFAdapter(Adapter):
    supported_layers = _SUPPORTED
    default_roles = ()  # PEFT's own OSF table (prepare_config), not roles
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "U_low": "osf_svd_params.U_low", "S_low": "osf_svd_params.S_low", "V_low": "osf_svd_params.V_low",
    }

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: OSFConfig) -> None:
        """``target_modules=None`` becomes PEFT's OSF names for the model type, or ``"all-linear"``."""
        if config.target_modules is None:
            cfg = getattr(model, "config", None)
            model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
            names = PEFT_TARGETS.get(model_type or "")
            config.target_modules = list(names) if names else "all-linear"

    def __init__(self, base: nn.Module, config: OSFConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: OSF wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        min_dim = min(self.d_out, self.d_in)
        self.k = effective_rank(config, key, min_dim)
        if self.k <= 0:
            field = "rank_pattern" if config.rank_pattern and any(re.search(p, key) for p in config.rank_pattern) \
                else "effective_rank"
            raise ValueError(f"{key}: OSFConfig.{field} resolves to a preserved rank of {self.k} on this "
                             f"{self.d_out} x {self.d_in} weight; expected an integer in [1, {min_dim}] (or a "
                             f"fraction of {min_dim} that is at least 1 / {min_dim})")
        self.r = min_dim - self.k
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        w = base.weight
        # the frozen parts always come from the base weight's SVD (no file carries them, as in PEFT)
        svd = OF.split_svd(self._natural(base), self.k, dtype)
        self.register_buffer("U_low_init", svd["U_low"].clone(), persistent=False)
        self.register_buffer("S_low_init", svd["S_low"].clone(), persistent=False)
        self.register_buffer("V_low_init", svd["V_low"].clone(), persistent=False)
        # the projection's basis: U0 / V0 span the complement when the factor is square, else the top-k
        self.u_keep, self.v_keep = self.d_out <= self.d_in, self.d_out >= self.d_in
        self.register_buffer("U_high", None if self.u_keep else svd["U_high"], persistent=False)
        self.register_buffer("V_high", None if self.v_keep else svd["V_high"], persistent=False)
        shapes = {"U_low": (self.d_out, self.r), "S_low": (self.r,), "V_low": (self.r, self.d_in)}
        for name, shape in shapes.items():
            if not init:
                value = torch.empty(shape, device=w.device, dtype=dtype)
            elif config.init_weights is False:  # random, PEFT's draws in its order (tests)
                value = torch.randn_like(svd[name])
            else:
                value = svd[name]
            setattr(self, name, nn.Parameter(value))

    @staticmethod
    def _natural(base: nn.Module) -> Tensor:
        """The base weight as (d_out, d_in)."""
        w = base.weight if base.weight.is_floating_point() else dequantize_weight(base)
        return w.t() if is_transposed(base) else w

    @classmethod
    def param_count(cls, base: nn.Module, config: OSFConfig, key: str = "") -> int:
        """Closed form: r (d_out + d_in + 1), r = min(d_out, d_in) - effective rank."""
        d_out, d_in = layer_dims(base)
        r = min(d_out, d_in) - effective_rank(config, key, min(d_out, d_in))
        return r * (d_out + d_in + 1)

    # -- forward ---------------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, ...]:
        """(U, S, V, U0, S0, V0), ``U`` and ``V`` behind the gradient projection."""
        u_basis = self.U_low_init if self.u_keep else self.U_high
        v_basis = self.V_low_init if self.v_keep else self.V_high
        u, v = self.U_low, self.V_low
        if torch.is_grad_enabled() and (u.requires_grad or v.requires_grad):
            u = OF.ProjectGrad.apply(u, u_basis, False, self.u_keep)
            v = OF.ProjectGrad.apply(v, v_basis, True, self.v_keep)
        return u, self.S_low, v, self.U_low_init, self.S_low_init, self.V_low_init

    def _dense(self, x: Tensor) -> bool:
        """Whether ``W + dW`` (one GEMM) is cheaper than the rank-2r product on this many tokens."""
        tokens = x.numel() // max(self.d_in, 1)
        return tokens * (self.d_in + self.d_out) > self.d_in * self.d_out

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and adapter in one GEMM with the weight ``W + dW`` formed for this call (nothing kept)."""
        w = base.weight
        if (type(base) not in _SUPPORTED or has_hooks(base) or w.dtype != self.U_low.dtype
                or x.dtype != w.dtype or not self._dense(x)):
            return None
        weight = (w.t() if self.transposed else w) + OF.osf_delta(*self._factors())
        return F.linear(x, weight, base.bias)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        factors = self._factors()
        xa = x.to(self.U_low.dtype)
        y = F.linear(xa, OF.osf_delta(*factors)) if self._dense(x) else OF.osf_apply(xa, *factors)
        return out + y.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        delta = OF.osf_delta(*self._factors())
        return delta.t() if self.transposed else delta
