"""VeLoRA, memory-efficient training with rank-1 sub-token projections (Miles et al. 2024, arXiv 2405.17991):
``LoraConfig(velora_config=VeloraConfig(...))``.

The forward is LoRA's, ``h = W0 x + s B A x``; only what the backward pass keeps of ``x`` changes. Each input token
x (d_in) is cut into ``G = num_groups`` sub-tokens of ``g = ceil(d_in / G)`` features (the last one zero-padded),
``x_j`` (g,), and each is kept as one number, its projection on a unit vector ``v`` (g,):

    c_j = <x_j, v>   (forward: (n, G) numbers instead of (n, d_in))
    x̂_j = scale c_j v  (backward: the rank-1 reconstruction)

so ``dL/dA = (dL/dh)^T x̂`` (approximate), while ``dL/dx = (dL/dh) A`` stays exact. A (r, d_in) and B (d_out, r)
train, W0 is frozen; ``v`` is a buffer, ``lora_velora_embed`` (g,), saved in the file beside ``lora_A`` /
``lora_B``. ``init_type`` "batch_average": before each training forward, ``v`` becomes the normalised mean of the
batch's sub-tokens (after dropout); "batch_average_once": on the first training forward of this process only (a
loaded adapter is re-averaged once, as peft); "random": a random unit vector drawn at init, never updated. Outside
training (or without autograd) the layer is plain LoRA, with LoRA's fast paths.

As peft 0.21.2 (``VeloraLinearVariant`` / ``VeloraFunction``): Linear layers only (nn.Linear, GPT-2's Conv1D; not
embeddings, convolutions or ``nn.MultiheadAttention``); ``v`` in the base weight's dtype; the parameter count is
LoRA's. peftkit's backward forms ``dL/dA`` as ``scale ((dL/dh)^T c) ⊗ v`` (r, G, g), never the (n, d_in)
reconstruction peft materialises: the same sum in another order (equal to float rounding), O(n r G) work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES
from . import dispatch
from .layer import LoraAdapter

FIELD = "velora_config"


# -- the math (pure functions) ------------------------------------------------------------------------------------
def group_dim(d_in: int, num_groups: int) -> int:
    """Features per sub-token, ``ceil(d_in / num_groups)``."""
    return (d_in + num_groups - 1) // num_groups


def subtokens(x: Tensor, num_groups: int) -> Tensor:
    """(n, G, g): the tokens of ``x`` (..., d_in) cut into sub-tokens, the last zero-padded to ``G g``."""
    d_in = x.shape[-1]
    padded = num_groups * group_dim(d_in, num_groups)
    if padded != d_in:
        x = F.pad(x, (0, padded - d_in))
    return x.reshape(-1, num_groups, padded // num_groups)


def normalize(v: Tensor) -> Tensor:
    """``v / ||v||`` in float32; a zero vector becomes the uniform unit vector (peft's rule, without a host sync)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    uniform = torch.full_like(v, v.numel() ** -0.5)
    return torch.where(norm == 0, uniform, v / norm.clamp_min(torch.finfo(torch.float32).tiny))


def batch_projection(x: Tensor, num_groups: int) -> Tensor:
    """The normalised mean sub-token of a batch (g,), float32."""
    sub = subtokens(x.detach(), num_groups)
    return normalize(sub.reshape(-1, sub.shape[-1]).mean(dim=0))


def compress(x: Tensor, v: Tensor, num_groups: int) -> Tensor:
    """(n, G): each sub-token's projection on ``v``."""
    return subtokens(x, num_groups) @ v.to(x.dtype)


def grad_factor(grad_h: Tensor, c: Tensor, v: Tensor, d_in: int, scale: float) -> Tensor:
    """``dL/dA`` (r, d_in) from ``dL/dh`` (n, r) and the kept projections ``c`` (n, G):
    ``scale ((dL/dh)^T c)[:, j] v`` for sub-token ``j``, cut back to d_in features."""
    r = grad_h.shape[-1]
    gc = grad_h.t() @ c  # (r, G)
    return (gc.unsqueeze(-1) * (v * scale)).reshape(r, -1)[:, :d_in]


class VeloraFunction(torch.autograd.Function):
    """``h = x A^T`` keeping ``compress(x)`` (n, G) for backward instead of ``x`` (n, d_in)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, v: Tensor, num_groups: int, scale: float) -> Tensor:
        out = F.linear(x, A)
        ctx.x_shape, ctx.x_dtype, ctx.num_groups, ctx.scale = x.shape, x.dtype, num_groups, scale
        c = compress(x, v, num_groups) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(c, A, v)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        c, A, v = ctx.saved_tensors
        dtype = grad_out.dtype
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2d @ A.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_A = grad_factor(g2d, c.to(dtype), v.to(dtype), ctx.x_shape[-1], ctx.scale).to(A.dtype)
        return grad_x, grad_A, None, None, None


# -- the adapter -------------------------------------------------------------------------------------------------
class VeloraAdapter(LoraAdapter):
    """LoRA whose lora_A keeps only rank-1 sub-token projections of its input for backward (see the module doc)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        if not isinstance(base, (nn.Linear, *CONV1D_TYPES)):
            raise ValueError("LoraConfig.velora_config: VeLoRA adapts Linear layers only (nn.Linear, Conv1D; as "
                             f"peft); {key or 'a target'} is a {type(base).__name__}: leave it out of target_modules")
        super().__init__(base, config, key, init=init)
        cfg = config.velora_config
        self.num_groups, self.velora_scale, self.init_type = cfg.num_groups, cfg.scale, cfg.init_type
        w = base.weight
        dtype = w.dtype if w.is_floating_point() else self.lora_A.dtype
        g = group_dim(self.lora_A.shape[1], self.num_groups)
        if self.init_type == "random":
            embed = normalize(torch.randn(g, device=w.device, dtype=dtype)).to(dtype)
        else:
            embed = torch.zeros(g, device=w.device, dtype=dtype)
        self.register_buffer("lora_velora_embed", embed)
        self.embed_ready = self.init_type == "random"  # "batch_average_once": set by the first training forward

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        return {**super().checkpoint_keys, "lora_velora_embed": "lora_velora_embed"}

    def _update_embed(self, x: Tensor) -> None:
        if self.init_type == "random" or (self.init_type == "batch_average_once" and self.embed_ready):
            return
        with torch.no_grad():
            v = batch_projection(x, self.num_groups)
            # a new tensor, not in place: a pending backward keeps the one its forward used (as peft)
            self.lora_velora_embed = v.to(device=self.lora_velora_embed.device, dtype=self.lora_velora_embed.dtype)
        self.embed_ready = True

    # -- forward ---------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        if self.training and torch.is_grad_enabled():
            return None  # VeLoRA's training path below
        return super().fused_forward(base, x)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(base, x, out)
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        self._update_embed(x)
        h = VeloraFunction.apply(x, A, self.lora_velora_embed, self.num_groups, self.velora_scale)
        if self.bias_B is not None or out.dtype != A.dtype:
            return out + (F.linear(h, self.lora_B, self.bias_B) * self.scaling).to(out.dtype)
        return self._accumulate(base, h, out)


dispatch.BY_FIELD[FIELD] = VeloraAdapter
