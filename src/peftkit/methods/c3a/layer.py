"""C3A (Chen et al. 2024, arXiv 2407.19342): parameter-efficient fine-tuning by circular convolution.

The update of a targeted layer is a block-circulant matrix: ``W = W0 + dW`` with ``dW`` made of
``(d_out / b) x (d_in / b)`` blocks, each the ``b x b`` circulant matrix of a trained kernel ``w_ij``
(``b`` numbers). ``dW x`` is then, per output block, a sum of circular convolutions of the input blocks
with the kernels, computed with the FFT:

    h = W0 x + dW x,     (dW x)_i = (1 / d_in) sum_j  w_ij (*) x_j      (circular cross-correlation)

so ``d_in d_out / b`` parameters train per target (a LoRA of rank ``d_in d_out / (b (d_in + d_out))`` has as
many) while the update may have full rank. ``W0`` is frozen.

As Hugging Face PEFT (the authors' implementation; files, shapes and numbers): the kernel is ``c3a_kernel``
(d_out / b, d_in / b, b), fp32 on half-precision bases, scaled by ``1 / d_in``; ``init_weights``:
"xavier_uniform" (default, and False) draws ``U(-a, a)`` with ``a = sqrt(6 / (d_in + d_out))``,
"kaiming_uniform" ``a = sqrt(1 / d_in)``, "gaussian" ``N(0, 1)``, True zeros (the model starts at the base).
``block_size`` must divide every target's sizes (``block_size_pattern`` overrides it per module); a layer it
does not divide is refused at ``get_peft_model`` with the allowed values, the model untouched.

The forward takes the cheaper of two routes (``functional.dense_is_cheaper``): wide layers with large
blocks go through the real FFT (``rfft`` / ``irfft``: half of PEFT's complex transforms; a custom autograd
function that keeps only the layer input and the kernel); narrow layers and small blocks form ``W0 + dW`` in
a temporary and run one GEMM for base and adapter together (``selective.functional.ReparamOp``: freed after
the call, rebuilt in backward, never kept). Merging adds ``dW`` (built by gathering, exact).

Deliberate differences from PEFT: GPT-2's Conv1D is wrapped too (PEFT wraps ``nn.Linear`` only; the kernel
is laid out as for the equivalent Linear); with several active C3A adapters on one layer each acts on the
layer's input (PEFT feeds the second adapter the first one's output); the input gradient is the true
``g (W0 + dW)`` (PEFT 0.21.2's ``BlockCircularConvolution.backward`` returns another circulant product for it,
so layers below an adapted one get other gradients in PEFT; outputs, kernel gradients and files agree);
``block_size`` < 1 or a non-integer fails when the config is built, not at injection.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ..selective.functional import ReparamOp, weight_op
from . import functional as CF
from .config import C3AConfig, block_size_for

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


class _DeltaBuilder:
    """``W0 + dW`` for ``ReparamOp`` in the base layout, and the map of its gradient back onto the kernel."""

    def __init__(self, d_in: int, transposed: bool) -> None:
        self.d_in, self.transposed = d_in, transposed

    def _delta(self, kernel: Tensor) -> Tensor:
        delta = CF.c3a_delta(kernel, self.d_in)
        return delta.t() if self.transposed else delta

    def effective(self, theta: tuple[Tensor, ...], w0: Tensor | None) -> Tensor:
        delta = self._delta(theta[0])
        return delta if w0 is None else w0 + delta.to(w0.dtype)

    def vjp(self, theta: tuple[Tensor, ...], grad: Tensor) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            kernel = theta[0].detach().requires_grad_(True)
            delta = self._delta(kernel)
            return torch.autograd.grad(delta, (kernel,), grad.to(delta.dtype))


@register_method(
    "c3a",
    config=C3AConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="d_in d_out / b per target (block_size b)",
    position="weight delta (block-circulant, by FFT) beside each targeted layer",
    paper="arXiv 2407.19342 (C3A)",
    examples={"c3a": {"block_size": 4, "init_weights": True}},
)
class C3AAdapter(Adapter):
    supported_layers = _SUPPORTED
    # PEFT's C3A table: LoRA's (query, value), except GPT-2's MLP output projection
    default_roles = {"gpt2": ("ffn_out",), "btlm": ("qkv", "attn_out", "ffn_out"), "*": ("query", "value")}
    checkpoint_keys: ClassVar[dict[str, str]] = {"c3a_kernel": "c3a_kernel"}

    def __init__(self, base: nn.Module, config: C3AConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: C3A wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.d_out, self.d_in = layer_dims(base)
        b, source = block_size_for(config, key)
        if self.d_in % b or self.d_out % b:
            raise ConfigError(
                f"C3AConfig.{source}: {b} does not divide the sizes of {key or 'the layer'} ({type(base).__name__}, "
                f"in {self.d_in}, out {self.d_out}); allowed values there: {CF.divisors_of_both(self.d_in, self.d_out)}")
        self.block_size = b
        self.transposed = is_transposed(base)
        w = base.weight
        shape = (self.d_out // b, self.d_in // b, b)
        self.c3a_kernel = nn.Parameter(torch.zeros(shape, device=w.device, dtype=adapter_dtype(base)))
        if init and config.init_weights is not True:
            with torch.no_grad():  # PEFT's draws, on an fp32 tensor of the same shape and device
                drawn = torch.zeros(shape, device=w.device, dtype=torch.float32)
                if config.init_weights == "gaussian":
                    nn.init.normal_(drawn)
                elif config.init_weights == "kaiming_uniform":
                    a = math.sqrt(1.0 / self.d_in)
                    nn.init.uniform_(drawn, -a, a)
                else:  # "xavier_uniform" or False
                    a = math.sqrt(3.0) * math.sqrt(2.0 / (self.d_in + self.d_out))
                    nn.init.uniform_(drawn, -a, a)
                self.c3a_kernel.copy_(drawn)
        self.op = weight_op(base)
        self.builder = _DeltaBuilder(self.d_in, self.transposed)

    @classmethod
    def param_count(cls, base: nn.Module, config: C3AConfig, key: str = "") -> int:
        """Closed form: (d_out / b) (d_in / b) b = d_in d_out / b."""
        d_out, d_in = layer_dims(base)
        return d_in * d_out // block_size_for(config, key)[0]

    # -- forward -------------------------------------------------------------------------------------------
    def _dense(self, x: Tensor) -> bool:
        tokens = x.numel() // max(x.shape[-1], 1)
        training = torch.is_grad_enabled() and self.c3a_kernel.requires_grad
        return CF.dense_is_cheaper(tokens, self.d_in, self.d_out, self.block_size, training)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and adapter in one GEMM with ``W0 + dW`` where that is cheaper (plain Linear / Conv1D, no hooks,
        no autocast, one dtype); otherwise None: the base runs, then the FFT route (``forward``)."""
        w, k = getattr(base, "weight", None), self.c3a_kernel
        if self.op is None or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        if not (x.dtype == w.dtype == k.dtype) or not self._dense(x):
            return None
        return ReparamOp.apply(x, base.bias, self.op, w, self.builder, k)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        k = self.c3a_kernel
        if self.op is not None and x.dtype == k.dtype and self._dense(x):
            y = ReparamOp.apply(x, None, self.op, None, self.builder, k)
        else:
            y = CF.c3a_apply(x, k, self.d_in)
        return out + y.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``dW`` in the base weight's layout ((d_in, d_out) for GPT-2's Conv1D)."""
        return self.builder._delta(self.c3a_kernel)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, kernel={tuple(self.c3a_kernel.shape)}"
