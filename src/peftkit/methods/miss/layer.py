"""MiSS (Kang & Yin, "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure",
arXiv 2409.15371; first published as Bone): a weight update built by sharing one small matrix across every
shard of the weight, on Linear and GPT-2 Conv1D layers.

The paper writes the update of ``W`` (d_out, d_in) in terms of one shared block ``D``:

- default ("balance"): ``D`` (r, d_out); the input is cut into ``ceil(d_in / r)`` shards of width r, so
  ``h = W x + D^T sum_j x_j`` (x_j: the j-th shard of x, the last one zero-padded), i.e. every (d_out, r)
  column shard of ``W`` gets ``D^T`` added: ``dW[o, j r + k] = D[k, o]``.
- ``"mini"``: ``D`` (r, mini_r) tiled ``d_out / mini_r`` times along the output dimension to (r, d_out).
- ``"bat"`` (Bone's block affine transformation): ``D`` (d_out / r, r, r); every (r, r) shard ``W_ij`` of
  ``W`` becomes ``W_ij + W_ij D_i + D_i``, a non-linear update that lets the shards interact
  (``h = (W + dW) x``).

``D`` starts at zero (the model starts at the base); ``init_weights=False`` draws the default (r, d_out)
block Kaiming-uniform. File key: ``miss_block`` (the same tensor and shape as PEFT's).

Differences from PEFT (0.21), whose files and numbers this follows: PEFT wraps only ``nn.Linear``; GPT-2's
Conv1D is wrapped here too (the block is laid out for the equivalent Linear). PEFT's bat forward ignores
``miss_dropout`` (as here) and its default / mini forward applies the dropout to the padded input (as here).
Shapes MiSS cannot factor fail at ``get_peft_model`` with a ``ConfigError`` naming the module (r larger
than the input width, bat's r not dividing both widths, mini_r not dividing the output width), before the
model changes; PEFT raises a ``ValueError`` with the bat / mini cases in the layer it is building.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import LINEAR_TYPES
from . import functional as MF
from .config import MissConfig


def _mode(config: MissConfig) -> str:
    if config.init_weights == "bat":
        return "bat"
    if config.init_weights == "mini":
        return "mini"
    return "miss"


def _block_shape(base: nn.Module, config: MissConfig, key: str) -> tuple[int, ...]:
    """The shape of ``miss_block`` on ``base``; a ConfigError naming the module when MiSS cannot shard it."""
    d_out, d_in = layer_dims(base)
    r, mode = config.r, _mode(config)
    where = key or type(base).__name__
    if r > d_in:
        raise ConfigError(f"{where}: MissConfig.r={r} exceeds the layer's input width {d_in}; "
                          f"expected 1 <= r <= {d_in}")
    if mode == "bat":
        if d_in % r or d_out % r:
            divisors = [k for k in range(1, min(d_in, d_out) + 1) if d_in % k == 0 and d_out % k == 0]
            raise ConfigError(f"{where}: MissConfig.r={r} with init_weights='bat' must divide the layer's input and "
                              f"output widths ({d_in}, {d_out}) into (r, r) blocks; allowed r: {divisors}")
        return (d_out // r, r, r)
    if mode == "mini":
        if d_out % config.mini_r:
            divisors = [k for k in range(1, d_out + 1) if d_out % k == 0]
            raise ConfigError(f"{where}: MissConfig.mini_r={config.mini_r} with init_weights='mini' must divide the "
                              f"layer's output width {d_out}; allowed mini_r: {divisors}")
        return (r, config.mini_r)
    return (r, d_out)


@register_method(
    "miss",
    config=MissConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r d_out per target (mini: r mini_r; bat: d_out / r blocks r x r)",
    position="one block shared by every r-wide shard of each targeted layer's weight",
    paper="arXiv 2409.15371 (MiSS, formerly Bone)",
    examples={"miss": {"r": 4}},
)
class MissAdapter(Adapter):
    supported_layers = LINEAR_TYPES
    default_roles = ("query", "value")  # PEFT's MiSS defaults are its LoRA defaults
    checkpoint_keys: ClassVar[dict[str, str]] = {"miss_block": "miss_block"}

    def __init__(self, base: nn.Module, config: MissConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.d_out, self.d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        self.mode = _mode(config)
        self.r = config.r
        shape = _block_shape(base, config, key)
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        self.miss_block = nn.Parameter(torch.zeros(shape, device=base.weight.device, dtype=dtype))
        self.dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()
        if init and config.init_weights is False:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))

    @classmethod
    def param_count(cls, base: nn.Module, config: MissConfig, key: str = "") -> int:
        """Closed form: r d_out (default and bat, whose d_out / r blocks are r x r), r mini_r (mini)."""
        return math.prod(_block_shape(base, config, key))

    # -- weights ---------------------------------------------------------------------------------------
    def _block(self) -> Tensor:
        """The (r, d_out) block of the default and mini variants."""
        return MF.tile_mini(self.miss_block, self.d_out) if self.mode == "mini" else self.miss_block

    def _natural(self, w: Tensor) -> Tensor:
        return w.t() if self.transposed else w

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for Conv1D); bat's depends on the base weight."""
        if self.mode == "bat":
            w = self._natural(base.weight).to(self.miss_block.dtype)
            delta = MF.bat_delta(w, self.miss_block)
        else:
            delta = MF.shared_delta(self._block(), self.d_in)
        return self._natural(delta)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        if self.mode != "bat":
            return super().merge(base, weight)
        w = self._natural(weight).to(self.miss_block.dtype)
        return self._natural(w + MF.bat_delta(w, self.miss_block)).to(weight.dtype), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        if self.mode != "bat":
            return super().unmerge(base, weight, state)
        w = self._natural(weight).to(self.miss_block.dtype)
        return self._natural(MF.bat_unmerge(w, self.miss_block)).to(weight.dtype)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        block = self.miss_block
        if x.dtype != block.dtype:
            x = x.to(block.dtype)
        if self.mode == "bat":  # (W + dW) x with dW formed from the current base weight; no dropout (PEFT)
            w = self._natural(base.weight).to(block.dtype)
            return out + F.linear(x, MF.bat_delta(w, block)).to(out.dtype)
        y = MF.shard_sum(self.dropout(x), self.r) @ self._block()  # (..., r) @ (r, d_out)
        return out + y.to(out.dtype)
