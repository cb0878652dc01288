"""PVeRA (arXiv 2512.07703): probabilistic vector-based random matrix adaptation.

VeRA's frozen random projections, shared by every adapted layer, with a probabilistic latent: each layer
learns two scaling vectors, ``d`` (2r) and ``b`` (d_out), and the r-dimensional latent is Gaussian,

    [mu; logvar] = Λ_d A x,        z = mu + eps ⊙ exp(logvar / 2),  eps ~ N(0, I)   (training)
    h = W0 x + Λ_b B z,                                                Λ_b = diag(b), Λ_d = diag(d)

with ``A`` (2r x d_in: the first r rows give the mean, the last r the log-variance) and ``B`` (d_out x r)
frozen and shared. In training the latent is sampled (the reparametrisation trick keeps it differentiable in
``d``); in eval mode it is the mean, ``z = mu`` (deterministic), unless ``sample_at_inference`` is set, then it
is sampled there too (one draw per call: Monte-Carlo averaging is up to the caller). A merge folds in the mean
path, ``ΔW = Λ_b B diag(d[:r]) A[:r]``, so merged == unmerged in eval mode without sampling.

Trainable: ``2 r + d_out`` per target; ``A``, ``B`` frozen. ``b`` starts at 0 (the model starts at the base),
``d`` at ``d_initial``. As in PEFT a layer also draws ``randn(2r)`` from the global generator when created
(PEFT draws ``d`` before resetting it), so a seeded run samples the same noise in both libraries.

Noise (as PEFT): with ``generator_seed`` each layer owns a CPU ``torch.Generator`` seeded with it (one per
layer and adapter; noise is drawn on CPU and moved), otherwise ``randn_like`` on the global generator.
Sampling advances that generator: a training forward is not free of state, so do not run training-mode
forwards of one model from several threads. Activation checkpointing restores torch's global generator
before it recomputes a block, not a layer's own: with ``generator_seed`` the recomputation draws new noise
and the gradients belong to another sample (as in PEFT); train with checkpointing on the global generator
(``generator_seed=None``, the default). No loss term is added (PEFT adds none).

Shared projections, files and several adapters: VeRA's machinery (``vera.shared_projections``): generated from
``projection_prng_key`` exactly as PEFT (Kaiming uniform, ``A`` then ``B`` from one seeded CPU generator),
kept once per adapter on the tuner, sized for the largest target and sliced per layer, and written as
``base_model.pvera_A`` / ``base_model.pvera_B`` when ``save_projection``. Per-layer keys ``pvera_lambda_b``
(d_out,), ``pvera_lambda_d`` (2r,). Linear and GPT-2 Conv1D layers.

Speed-up over PEFT, same numbers: without sampling only the mean rows ``A[:r]`` are applied (PEFT computes
all 2r and drops half).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import LINEAR_TYPES, find_targets
from ..vera import shared_projections
from . import functional as PF
from .config import PveraConfig

KEYS = ("pvera_A", "pvera_B")
# PEFT's PVeRA defaults: VeRA's (LoRA's, but query and value on phi), plus DINOv2's "query" and "value", which
# peftkit's role table lacks (select_targets adds them). transformers 5 renamed them "q_proj" / "v_proj" (where
# PEFT's default then matches nothing): each role takes the spelling present in the model
ARCH_DEFAULTS = {"dinov2": (("query", "q_proj"), ("value", "v_proj"))}


@register_method(
    "pvera",
    config=PveraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="2r + d_out per target (A, B frozen, shared)",
    position="diag(b) B z beside each targeted layer, z ~ N(mu, exp(logvar)), [mu; logvar] = diag(d) A x; "
             "A, B shared random",
    paper="arXiv 2512.07703 (PVeRA)",
    # one example (the contract suite runs it on every family); save_projection=False is covered by the parity table
    examples={"pvera": {"r": 4, "projection_prng_key": 7}},
)
class PveraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = {"phi": ("query", "value"), "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"pvera_lambda_b": "pvera_lambda_b",
                                                 "pvera_lambda_d": "pvera_lambda_d"}
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {k: k for k in KEYS}

    def __init__(
        self, base: nn.Module, config: PveraConfig, key: str = "", init: bool = True,
        shared: SharedState | None = None,
    ) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.r = config.r
        self.transposed = is_transposed(base)
        self.sample_at_inference = bool(config.sample_at_inference)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns projections sized for its layer
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        self.__dict__["shared"] = shared  # the tuner's single copy, deliberately not a submodule
        # one CPU generator per layer and adapter (PEFT's pvera_generator), or the global one
        seed = config.generator_seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.dropout = nn.Dropout(config.pvera_dropout) if config.pvera_dropout > 0 else nn.Identity()
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.pvera_lambda_b = nn.Parameter(torch.zeros(self.d_out, device=w.device, dtype=dtype))  # (d_out,)
        self.pvera_lambda_d = nn.Parameter(torch.zeros(2 * self.r, device=w.device, dtype=dtype))  # (2r,)
        if init:
            draw = torch.randn(2 * self.r)  # PEFT's draw of d (kept when init_weights is False)
            with torch.no_grad():
                if config.init_weights:
                    self.pvera_lambda_d.fill_(config.d_initial)
                else:
                    self.pvera_lambda_b.fill_(1.0)
                    self.pvera_lambda_d.copy_(draw)

    # -- targets and the shared projections ----------------------------------------------------------------
    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in ARCH_DEFAULTS:
            paths = [n for n, _ in named]
            present = [next((o for o in opts if any(p == o or p.endswith("." + o) for p in paths)), opts[0])
                       for opts in ARCH_DEFAULTS[model_type]]
            config = copy.copy(config)  # the user's config keeps target_modules=None, as for other architectures
            config.target_modules = present
        return find_targets(model, named, config, cls.default_roles, cls.supported_layers)

    @classmethod
    def build_shared(
        cls, targets: list[tuple[str, nn.Module]], config: PveraConfig,
        others: dict[str, tuple[Any, dict[str, Tensor]]],
    ) -> dict[str, Tensor]:
        """``A`` (2r, max d_in) and ``B`` (max d_out, r) for a new adapter: VeRA's ``shared_projections``."""
        return shared_projections(targets, config, others, keys=KEYS, a_rows=2 * config.r, label="PVeRA")

    @classmethod
    def saves_shared(cls, config: PveraConfig) -> bool:
        return config.save_projection

    @classmethod
    def param_count(cls, base: nn.Module, config: PveraConfig, key: str = "") -> int:
        """Closed form: 2r + d_out per target (the projections are frozen buffers)."""
        return 2 * config.r + layer_dims(base)[0]

    def _projections(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's slices ``A[:, :d_in]`` (2r, d_in) and ``B[:d_out, :]`` (d_out, r), in ``like``'s dtype."""
        a = self.shared.pvera_A[:, : self.d_in].to(like.device, like.dtype)
        b = self.shared.pvera_B[: self.d_out, :].to(like.device, like.dtype)
        return a, b

    # -- forward and merge -----------------------------------------------------------------------------------
    def latent(self, x: Tensor, a: Tensor) -> Tensor:
        """The latent ``z`` (..., r) of the layer input ``x`` (in the adapter's dtype; ``a``: this layer's slice of
        ``A``): a sample in training or with ``sample_at_inference``, else the mean."""
        lambda_d = self.pvera_lambda_d
        if not (self.training or self.sample_at_inference):
            return PF.pvera_mean_latent(self.dropout(x), a, lambda_d)
        mu, logvar = PF.pvera_latent_stats(self.dropout(x), a, lambda_d)
        return PF.reparametrize(mu, logvar, PF.sample_noise(logvar, self.generator))

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        a, b = self._projections(self.pvera_lambda_d)
        z = self.latent(x.to(a.dtype), a)
        return out + PF.pvera_output(z, b, self.pvera_lambda_b).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """The mean path ``diag(b) B diag(d[:r]) A[:r]`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        a, b = self._projections(self.pvera_lambda_d)
        delta = PF.pvera_mean_delta(self.pvera_lambda_b, self.pvera_lambda_d, a, b)
        return delta.t() if self.transposed else delta
