"""VeRA (Kopiczko et al. 2024, arXiv 2310.11454): vector-based random matrix adaptation.

One pair of frozen random matrices ``A`` (r x d_in) and ``B`` (d_out x r) is shared by every adapted layer
of a model; each layer learns only two scaling vectors, ``d`` (r) and ``b`` (d_out):

    h = W0 x + Λ_b B Λ_d A x,      Λ_b = diag(b), Λ_d = diag(d)

``b`` starts at 0 (so the model starts at the base) and ``d`` at ``d_initial`` (0.1, Table 6c of the
paper). With layers of different shapes, the shared matrices are sized for the largest input and output
dimension among the targets and each layer uses the top-left slice ``A[:, :d_in]``, ``B[:d_out, :]``.

The projections are generated from ``projection_prng_key`` exactly as Hugging Face PEFT does (Kaiming
uniform, ``A`` then ``B`` from one seeded CPU generator), kept once per adapter on the tuner, and written
to the adapter file as ``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` is True; a
file without them loads by regenerating them from the seed. Per-layer keys: ``vera_lambda_b`` (d_out,),
``vera_lambda_d`` (r,). Linear and GPT-2 Conv1D layers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability
from ..layers import Adapter, SharedState
from ..kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ..registry import register_method
from ..targeting import LINEAR_TYPES


@dataclasses.dataclass
class VeraConfig(PeftConfig):
    """VeRA configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        r: rank of the shared random projections (VeRA uses far larger ranks than LoRA: 256 by default).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks
            the architecture's query and value projections.
        projection_prng_key: seed of the shared projections ``A`` and ``B`` (the same for every VeRA
            adapter on a model).
        save_projection: write ``A`` and ``B`` into the adapter file (bigger file, but it does not depend on
            the random number generator reproducing them); when False they are regenerated on load.
        vera_dropout: dropout on the layer input of the adapter branch.
        d_initial: initial value of every entry of ``d`` (small values, <= 0.1, are recommended).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "vera_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True starts ``b`` at 0 and ``d`` at ``d_initial``; False (for tests) ``b`` at 1 and
            ``d`` standard normal, so the model does not start at the base.
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check = self._check
        check_int(self, "r", 1)
        check_int(self, "projection_prng_key")
        check_bool(self, "save_projection")
        check_probability(self, "vera_dropout")
        check_number(self, "d_initial")
        check(self.bias in ("none", "all", "vera_only"), "bias", "'none', 'all' or 'vera_only'")
        check_bool(self, "init_weights")
        if isinstance(self.target_modules, (set, tuple, frozenset)):
            self.target_modules = sorted(self.target_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("VeraConfig.layers_pattern: only meaningful together with layers_to_transform")
        if not self.save_projection:
            warnings.warn(
                "VeraConfig.save_projection=False: vera_A / vera_B are not saved and will be regenerated from "
                "projection_prng_key on load", stacklevel=3,
            )


# -- weight math (pure functions) --------------------------------------------------------------------------
def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]: PEFT's
    ``_kaiming_init`` (float32, same arithmetic, same generator call)."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, d_in: int, d_out: int, seed: int, a_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """The shared frozen projections ``A`` (r, d_in) and ``B`` (d_out, r), drawn in this order from one
    CPU generator seeded with ``seed`` (identical to PEFT's ``_init_vera_A_vera_B``). ``a_rows``: another
    height of ``A`` (PVeRA's ``2 r``: mean and log-variance rows)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((r if a_rows is None else a_rows, d_in), generator)
    b = kaiming_uniform((d_out, r), generator)
    return a, b


def vera_delta(lambda_b: Tensor, lambda_d: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``diag(lambda_b) B diag(lambda_d) A`` as (d_out, d_in), given the layer's slices of ``A`` and ``B``."""
    return (lambda_b.unsqueeze(-1) * b) @ (lambda_d.unsqueeze(-1) * a)


def shared_projections(
    targets: list[tuple[str, nn.Module]], config: Any, others: dict[str, tuple[Any, dict[str, Tensor]]],
    keys: tuple[str, str] = ("vera_A", "vera_B"), a_rows: int | None = None, label: str = "VeRA",
) -> dict[str, Tensor]:
    """The shared projections of a new adapter (``keys``: their names; ``a_rows``: the height of ``A``, default
    ``r``), sized for its largest target; VeRA's and PVeRA's ``build_shared``.

    As in PEFT, an adapter added next to existing adapters of the method reuses the first one's projections
    (a private copy here, so loading one adapter's file cannot change another's); it must then have
    the same seed, the same ``save_projection`` and the same rank, and fit in their dimensions.
    """
    cfg = type(config).__name__
    dims = [layer_dims(base) for _, base in targets]
    d_out, d_in = max(d[0] for d in dims), max(d[1] for d in dims)
    for name, (other, _) in others.items():
        if other.projection_prng_key != config.projection_prng_key:
            raise ConfigError(
                f"{cfg}.projection_prng_key: {config.projection_prng_key} differs from adapter {name!r}'s "
                f"{other.projection_prng_key}; all {label} adapters on a model share one key (as in PEFT)"
            )
        if other.save_projection != config.save_projection:
            raise ConfigError(
                f"{cfg}.save_projection: {config.save_projection} differs from adapter {name!r}'s "
                f"{other.save_projection}; the projections are saved for all {label} adapters or for none"
            )
    ka, kb = keys
    if not others:
        a, b = vera_projections(config.r, d_in, d_out, config.projection_prng_key, a_rows)
        device = targets[0][1].weight.device
        return {ka: a.to(device), kb: b.to(device)}
    name, (_, tensors) = next(iter(others.items()))
    a, b = tensors[ka], tensors[kb]
    if b.shape[1] != config.r:
        raise ConfigError(
            f"{cfg}.r: {config.r} differs from the rank {b.shape[1]} of the projections shared with adapter "
            f"{name!r}; a {label} adapter added to a model with {label} adapters must use the same r"
        )
    too_big = [(p, d) for (p, _), d in zip(targets, dims) if d[1] > a.shape[1] or d[0] > b.shape[0]]
    if too_big:
        path, (o, i) = too_big[0]
        raise ValueError(
            f"{path}: a {o} x {i} layer does not fit the projections shared with adapter {name!r} "
            f"({ka} {tuple(a.shape)}, {kb} {tuple(b.shape)}); add the adapter with the larger layers first"
        )
    return {ka: a.clone(), kb: b.clone()}


@register_method(
    "vera",
    config=VeraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r + d_out per target (A, B frozen, shared)",
    position="weight delta diag(b) B diag(d) A beside each targeted layer; A, B shared random",
    paper="arXiv 2310.11454 (VeRA)",
    examples={
        "vera": {"r": 4},
        "vera-seed": {"r": 6, "save_projection": False, "projection_prng_key": 7, "d_initial": 0.5},
    },
)
class VeraAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    # PEFT's VeRA defaults are LoRA's, but query and value only on phi (where LoRA adds fc1 / fc2)
    default_roles = {"phi": ("query", "value"), "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {"vera_A": "vera_A", "vera_B": "vera_B"}

    def __init__(
        self, base: nn.Module, config: VeraConfig, key: str = "", init: bool = True, shared: SharedState | None = None
    ) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.r = config.r
        self.transposed = is_transposed(base)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns projections sized for its layer
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        # a reference to the tuner's single copy, deliberately not a submodule (no per-layer copy or key)
        self.__dict__["shared"] = shared
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out, device=w.device, dtype=dtype))  # (d_out,)
        self.vera_lambda_d = nn.Parameter(torch.zeros(self.r, device=w.device, dtype=dtype))  # (r,)
        if init:
            with torch.no_grad():
                if config.init_weights:
                    self.vera_lambda_d.fill_(config.d_initial)
                else:
                    self.vera_lambda_b.fill_(1.0)
                    self.vera_lambda_d.copy_(torch.randn(self.r))

    # -- the shared projections ---------------------------------------------------------------------------
    @classmethod
    def build_shared(
        cls, targets: list[tuple[str, nn.Module]], config: VeraConfig, others: dict[str, tuple[Any, dict[str, Tensor]]]
    ) -> dict[str, Tensor]:
        """``A`` and ``B`` for a new adapter, sized for its largest target (``shared_projections``)."""
        return shared_projections(targets, config, others)

    @classmethod
    def saves_shared(cls, config: VeraConfig) -> bool:
        return config.save_projection

    @classmethod
    def param_count(cls, base: nn.Module, config: VeraConfig, key: str = "") -> int:
        """Closed form: r + d_out per target (the projections are frozen buffers)."""
        return config.r + layer_dims(base)[0]

    def _projections(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's slices ``A[:, :d_in]`` (r, d_in) and ``B[:d_out, :]`` (d_out, r), in ``like``'s dtype."""
        a = self.shared.vera_A[:, : self.d_in].to(like.device, like.dtype)
        b = self.shared.vera_B[: self.d_out, :].to(like.device, like.dtype)
        return a, b

    # -- forward and merge -----------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        lambda_b, lambda_d = self.vera_lambda_b, self.vera_lambda_d
        a, b = self._projections(lambda_d)
        h = F.linear(self.dropout(x.to(lambda_d.dtype)), a)  # (..., r)
        return out + (lambda_b * F.linear(lambda_d * h, b)).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``diag(b) B diag(d) A`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        a, b = self._projections(self.vera_lambda_d)
        delta = vera_delta(self.vera_lambda_b, self.vera_lambda_d, a, b)
        return delta.t() if self.transposed else delta
