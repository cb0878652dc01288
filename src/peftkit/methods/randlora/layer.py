"""RandLoRA (Albert et al. 2025, arXiv 2502.00987): full-rank adaptation from shared random bases.

The paper writes the update of a weight ``W`` (d x b, here d_out x d_in with ``b <= d``) as a sum of ``N``
random rank-r bases, each scaled by two trainable diagonals:

    W' = W + s sum_{n=1..N} B_n Lambda_n A Gamma_n,     N = ceil(min(d_in, d_out) / r),   s = alpha / r

``B_n`` (d x r) and ``A`` (r x b) are frozen random matrices shared by every adapted layer (``A`` is one
basis for all ``n``), ``Lambda_n = diag(lambda[:, n])`` (r x r) and ``Gamma_n = diag(gamma[n])`` (b x b) are
trained. Trainable numbers per layer: ``r N + N m`` with ``m = min(d_in, d_out)``.

Tensors and file keys (as Hugging Face PEFT): ``randlora_lambda`` (r, N), ``randlora_gamma`` (N, m) per
layer; the shared bases ``randlora_A`` (r, 1, m_max) and ``randlora_B`` (M_max, N_max, r), sized for the
largest target (``m_max`` / ``M_max``: smaller / larger side of the element-wise largest target shape) and
sliced per layer. They sit once on the tuner (``TunerModel.shared_state``); with ``save_projection`` the
file holds them at ``base_model.randlora_A`` / ``base_model.randlora_B`` and, as PEFT writes them, again
under every layer's path. Linear and GPT-2 Conv1D layers.

Where PEFT differs from the paper (peftkit follows PEFT's numbers and files):

- the scaled basis ``lambda[i, n] A[i] gamma[n]`` is flattened in (rank, basis) order while ``B`` is
  flattened (basis, rank), so column ``n r + i`` of ``B`` meets scaled row ``n r + i`` = (rank ``(n r + i) // N``,
  basis ``(n r + i) % N``): a fixed permutation of the pairing of random columns, still a sum of
  ``r N`` random rank-one terms each scaled by one ``lambda`` entry and a row of ``gamma``;
- the trainable side is always on the layer's smaller dimension (``A Gamma`` on the input when
  ``d_in <= d_out``, on the output otherwise);
- the dense bases are Kaiming-uniform draws in bfloat16 (float16 on CUDA devices without bfloat16), each
  divided by its std; ``init_weights`` starts ``lambda`` at 0 and ``gamma`` at ``1 / max(N, m)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as RF
from .config import RandLoraConfig


@register_method(
    "randlora",
    config=RandLoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="N (r + m) per target, m = min(d_in, d_out), N = ceil(m / r) (bases frozen, shared)",
    position="weight delta sum_n B_n diag(lambda_n) A diag(gamma_n) beside each targeted layer",
    paper="arXiv 2502.00987 (RandLoRA)",
    examples={"randlora": {"r": 4, "randlora_alpha": 8}},
)
class RandLoraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's RandLoRA defaults are its LoRA defaults
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {"randlora_A": "randlora_A", "randlora_B": "randlora_B"}

    def __init__(
        self, base: nn.Module, config: RandLoraConfig, key: str = "", init: bool = True,
        shared: SharedState | None = None,
    ) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.r = config.r
        self.n = RF.num_bases(self.d_out, self.d_in, self.r)
        self.scaling = config.randlora_alpha / config.r
        self.transposed = is_transposed(base)
        self.save_projection = bool(config.save_projection)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns bases sized for its layer
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        self.__dict__["shared"] = shared  # the tuner's single copy, deliberately not a submodule
        self.dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        w = base.weight
        small = min(self.d_out, self.d_in)
        dtype = adapter_dtype(base)
        self.randlora_lambda = nn.Parameter(torch.zeros(self.r, self.n, device=w.device, dtype=dtype))  # (r, N)
        self.randlora_gamma = nn.Parameter(torch.empty(self.n, small, device=w.device, dtype=dtype))  # (N, m)
        if init:
            with torch.no_grad():
                if config.init_weights:
                    self.randlora_gamma.fill_(1 / max(self.n, small))
                else:
                    self.randlora_lambda.copy_(torch.randn(self.r, self.n))
                    self.randlora_gamma.fill_(1 / max(self.d_out, self.d_in))

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        keys = {"randlora_lambda": "randlora_lambda", "randlora_gamma": "randlora_gamma"}
        if self.save_projection:  # PEFT writes the shared bases under every layer's path too
            keys.update(randlora_A="randlora_A", randlora_B="randlora_B")
        return keys

    @property
    def randlora_A(self) -> Tensor:
        return self.shared.randlora_A

    @property
    def randlora_B(self) -> Tensor:
        return self.shared.randlora_B

    # -- the shared bases ----------------------------------------------------------------------------------
    @classmethod
    def build_shared(
        cls, targets: list[tuple[str, nn.Module]], config: RandLoraConfig,
        others: dict[str, tuple[Any, dict[str, Tensor]]],
    ) -> dict[str, Tensor]:
        """``randlora_A`` / ``randlora_B`` for a new adapter, sized for the element-wise largest (d_out, d_in)
        of its targets and drawn from ``projection_prng_key`` as PEFT does. As PEFT, every RandLoRA adapter
        on a model must use the same key and the same ``save_projection``; each adapter gets its own bases."""
        for name, (other, _) in others.items():
            if other.projection_prng_key != config.projection_prng_key:
                raise ConfigError(
                    f"RandLoraConfig.projection_prng_key: {config.projection_prng_key} differs from adapter {name!r}'s "
                    f"{other.projection_prng_key}; all RandLoRA adapters on a model share one key (as in PEFT)"
                )
            if other.save_projection != config.save_projection:
                raise ConfigError(
                    f"RandLoraConfig.save_projection: {config.save_projection} differs from adapter {name!r}'s "
                    f"{other.save_projection}; the bases are saved for all RandLoRA adapters or for none"
                )
        dims = [layer_dims(base) for _, base in targets]
        d_out, d_in = max(d[0] for d in dims), max(d[1] for d in dims)
        seed = config.projection_prng_key
        if config.very_sparse:
            a, b = RF.sparse_bases(config.r, d_out, d_in, seed, math.sqrt(min(d_out, d_in)))
        elif config.sparse:
            a, b = RF.sparse_bases(config.r, d_out, d_in, seed, 3)
        else:
            a, b = RF.dense_bases(config.r, d_out, d_in, seed)
        device = targets[0][1].weight.device
        return {"randlora_A": a.to(device), "randlora_B": b.to(device)}

    @classmethod
    def saves_shared(cls, config: RandLoraConfig) -> bool:
        return config.save_projection

    @classmethod
    def param_count(cls, base: nn.Module, config: RandLoraConfig, key: str = "") -> int:
        """Closed form: ``N (r + m)``, ``m = min(d_in, d_out)``, ``N = ceil(m / r)`` (the bases are frozen)."""
        d_out, d_in = layer_dims(base)
        n = RF.num_bases(d_out, d_in, config.r)
        return n * (config.r + min(d_out, d_in))

    # -- forward and merge ---------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor]:
        lam = self.randlora_lambda
        a = self.shared.randlora_A.to(lam.device, lam.dtype)
        b = self.shared.randlora_B.to(lam.device, lam.dtype)
        return RF.factors(a, b, lam, self.randlora_gamma, self.d_out, self.d_in)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        down, up = self._factors()
        h = F.linear(F.linear(self.dropout(x.to(down.dtype)), down), up)
        return out + (h * self.scaling).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``s up down`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        down, up = self._factors()
        d = RF.delta(down, up, self.scaling)
        return d.t() if self.transposed else d
