"""VB-LoRA (Li et al. 2024, arXiv 2405.15179): "Extreme parameter efficient fine-tuning with vector banks".

Every adapted layer keeps LoRA's form ``h = W0 x + B A x`` with ``A`` (r x d_in) and ``B`` (d_out x r), but
neither factor is stored. Both are cut into sub-vectors of length ``b`` (``vector_length``), and each
sub-vector is a top-k mixture of the vectors of one bank ``V`` (``num_vectors`` x b) shared by all layers:

    s = sum_{j in topk(l)} softmax(l_topk)_j  v_j          (paper, eq. 3)

with one logit vector ``l`` (num_vectors,) per sub-vector. Shapes (PEFT's layout): ``vblora_logits_A``
(r, d_in / b, num_vectors) gives ``A`` row by row; ``vblora_logits_B`` (d_out / b, r, num_vectors) gives ``B``
column by column. The bank is trained (it is adapter-level state: one copy per adapter on the tuner, the same
``nn.Parameter`` referenced by every layer's adapter, counted once), starts uniform in
``[-init_vector_bank_bound, init_vector_bank_bound]``; the logits start normal (``init_logits_std``). The
method therefore does not start at the base model (neither in the paper nor in PEFT).

File layout as PEFT's: ``<layer>.vblora_logits_A`` / ``_B`` per layer and ``base_model.vblora_vector_bank``;
with ``save_only_topk_weights``, ``<layer>.vblora_logits_A_topk_indices`` (uint8 / int16 / int32 by bank size)
and ``..._topk_weights`` (the first k-1 softmax weights) instead of the logits, which a load turns back into
logits (``log w`` at the indices, ``-inf`` elsewhere: same factors, inference only), as PEFT does.

Differences from PEFT: PEFT draws a new bank for every target while injecting (keeping the last draw) and
interleaves those draws with the logits' initialisation; here the bank is drawn once, before the layers, so
a fresh adapter's random start differs from PEFT's under the same seed (files, counts and outputs of loaded
adapters agree). Widths that ``vector_length`` does not divide are refused with a ``ConfigError`` before the
model changes (PEFT raises a ``ValueError`` after wrapping the earlier layers).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from ..lora.kernels import LoraLinear
from . import functional as VF
from .config import VBLoRAConfig

_FULL_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def check_widths(targets: list[tuple[str, nn.Module]], config: VBLoRAConfig) -> None:
    """Every target's input and output width is a multiple of ``vector_length`` (else a ConfigError naming the
    module, the field and the vector lengths that would fit every target)."""
    dims = [layer_dims(base) for _, base in targets]
    for (path, _), (d_out, d_in) in zip(targets, dims):
        if d_in % config.vector_length or d_out % config.vector_length:
            g = math.gcd(*[d for pair in dims for d in pair])
            allowed = [v for v in range(1, g + 1) if g % v == 0]
            raise ConfigError(
                f"VBLoRAConfig.vector_length: {config.vector_length} does not divide the widths of {path} "
                f"(d_in={d_in}, d_out={d_out}); vector lengths that divide every target's widths: {allowed}"
            )


@register_method(
    "vblora",
    config=VBLoRAConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) / b x num_vectors logits per target, plus one bank num_vectors x b per adapter",
    position="weight delta B A beside each targeted layer; A, B top-k mixtures of a shared, trained vector bank",
    paper="arXiv 2405.15179 (VB-LoRA)",
    starts_at_base=False,
    examples={"vblora": {"r": 2, "num_vectors": 8, "vector_length": 1, "topk": 2}},
)
class VBLoRAAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = {"t5": _FULL_ROLES, "bart": _FULL_ROLES, "opt": _FULL_ROLES, "gpt2": ("qkv",),
                     "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"vblora_logits_A": "vblora_logits_A",
                                                 "vblora_logits_B": "vblora_logits_B"}
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {"vblora_vector_bank": "vblora_vector_bank"}

    def __init__(self, base: nn.Module, config: VBLoRAConfig, key: str = "", init: bool = True,
                 shared: SharedState | None = None) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        if shared is None:  # a stand-alone adapter (outside a tuner) owns its bank
            shared = SharedState(self.build_shared([(key, base)], config, {}))
        else:
            check_widths([(key, base)], config)
        self.__dict__["shared"] = shared
        # the tuner's one bank, registered here too (the same Parameter object: counted and trained once)
        self.vblora_vector_bank = shared.vblora_vector_bank
        self.r, self.topk, self.num_vectors = config.r, config.topk, config.num_vectors
        b = config.vector_length
        self.dropout = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()
        dtype, device = adapter_dtype(base), base.weight.device
        self.vblora_logits_A = nn.Parameter(torch.zeros(self.r, self.d_in // b, self.num_vectors, device=device,
                                                        dtype=dtype))
        self.vblora_logits_B = nn.Parameter(torch.zeros(self.d_out // b, self.r, self.num_vectors, device=device,
                                                        dtype=dtype))
        if init:
            with torch.no_grad():
                nn.init.normal_(self.vblora_logits_A, 0, config.init_logits_std)
                nn.init.normal_(self.vblora_logits_B, 0, config.init_logits_std)
        if config.save_only_topk_weights:  # the file holds top-k indices and weights instead of the logits
            self.checkpoint_keys = {f"_topk_{m}_{part}": f"vblora_logits_{m}_topk_{part}"
                                    for m in ("A", "B") for part in ("indices", "weights")}
            for m in ("A", "B"):
                logits = getattr(self, f"vblora_logits_{m}")
                shape = (*logits.shape[:-1], self.topk)
                self.register_buffer(f"_topk_{m}_indices_buf", torch.zeros(
                    shape, dtype=VF.index_dtype(self.num_vectors), device=device), persistent=False)
                self.register_buffer(f"_topk_{m}_weights_buf", torch.zeros(
                    (*shape[:-1], self.topk - 1), dtype=dtype, device=device), persistent=False)
            self._synced: tuple[int, ...] | None = None

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: VBLoRAConfig) -> int:
        """The trained vector bank: num_vectors x vector_length, once per adapter."""
        return config.num_vectors * config.vector_length

    # -- the shared vector bank ------------------------------------------------------------------------------
    @classmethod
    def build_shared(cls, targets: list[tuple[str, nn.Module]], config: VBLoRAConfig,
                     others: dict[str, tuple[Any, dict[str, Tensor]]]) -> dict[str, Tensor]:
        """The adapter's vector bank (num_vectors, vector_length), uniform in [-bound, bound] (PEFT's init), as a
        trainable Parameter; every adapter has its own bank (``others`` is not used)."""
        check_widths(targets, config)
        device = targets[0][1].weight.device
        bank = torch.zeros(config.num_vectors, config.vector_length, device=device)
        nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
        return {"vblora_vector_bank": nn.Parameter(bank)}

    @classmethod
    def param_count(cls, base: nn.Module, config: VBLoRAConfig, key: str = "") -> int:
        """Closed form per target: the logits, ``r (d_in + d_out) / b x num_vectors``. The bank
        (``num_vectors x vector_length``) is counted once per adapter, not per target."""
        d_out, d_in = layer_dims(base)
        return config.r * (d_in + d_out) // config.vector_length * config.num_vectors

    # -- save_only_topk_weights: the file's top-k form, kept in step with the logits ------------------------------
    def _versions(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"_topk_{m}_{p}_buf")._version for m in ("A", "B") for p in ("indices", "weights"))

    def _topk_view(self, m: str, part: str) -> Tensor:
        """The buffer a save reads (filled from the logits now) and a load writes (turned into logits on use)."""
        with torch.no_grad():
            self._sync_topk()
            logits = getattr(self, f"vblora_logits_{m}")
            if not logits.is_meta:
                indices, weights = VF.logits_to_topk(logits, self.topk, self.num_vectors)
                getattr(self, f"_topk_{m}_indices_buf").copy_(indices)
                getattr(self, f"_topk_{m}_weights_buf").copy_(weights)
            self._synced = self._versions()
        return getattr(self, f"_topk_{m}_{part}_buf")

    _topk_A_indices = property(lambda self: self._topk_view("A", "indices"))
    _topk_A_weights = property(lambda self: self._topk_view("A", "weights"))
    _topk_B_indices = property(lambda self: self._topk_view("B", "indices"))
    _topk_B_weights = property(lambda self: self._topk_view("B", "weights"))

    @torch.no_grad()
    def _sync_topk(self) -> None:
        """After a load wrote the top-k buffers: logits rebuilt from them (PEFT's ``-inf`` / ``log w`` form)."""
        if "_synced" not in self.__dict__ or self._synced is None or self._versions() == self._synced:
            return
        for m in ("A", "B"):
            logits = getattr(self, f"vblora_logits_{m}")
            rebuilt = VF.topk_to_logits(getattr(self, f"_topk_{m}_indices_buf"),
                                        getattr(self, f"_topk_{m}_weights_buf"), self.num_vectors)
            logits.copy_(rebuilt.to(logits.dtype))
        self._synced = self._versions()

    # -- forward and merge -----------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor]:
        """``A`` (r, d_in) and ``B`` (d_out, r)."""
        self._sync_topk()
        logits_a, logits_b = self.vblora_logits_A, self.vblora_logits_B
        if self.training and logits_a[0, 0].isinf().any():
            raise RuntimeError("VB-LoRA logits hold infinities: an adapter saved with save_only_topk_weights=True "
                               "is for merging and inference only, not for resuming training")
        bank = self.vblora_vector_bank.to(logits_a.device)
        return VF.vblora_factors(logits_a, logits_b, bank, self.topk)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and update in one pass on a plain Linear / Conv1D of the adapter's dtype: LoRA's kernel with the
        mixed factors (scaling 1); the update accumulates into the fresh base output and its input gradient into
        the base one, so no (tokens x d_out) temporary is added."""
        w, bank = base.weight, self.vblora_vector_bank
        if type(base) not in LINEAR_TYPES or has_hooks(base) or w.dtype != bank.dtype or x.dtype != w.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        a, b = self._factors()
        x2d = x.reshape(-1, self.d_in)
        xd = None if isinstance(self.dropout, nn.Identity) else self.dropout(x2d)
        out = LoraLinear.apply(x2d, xd, w, base.bias, a, b, 1.0, self.transposed)
        return out.view(*x.shape[:-1], self.d_out)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        a, b = self._factors()
        x = x.to(self.vblora_vector_bank.dtype)
        return out + F.linear(F.linear(self.dropout(x), a), b).to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``B A`` in the base weight's layout ((d_in, d_out) for Conv1D)."""
        a, b = self._factors()
        delta = b @ a
        return delta.t() if self.transposed else delta
