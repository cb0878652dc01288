"""LoRA adapter (Hu et al. 2021, arXiv 2106.09685): ``h = W0 x + s B A x``, ``s = alpha / r``.

Variants are options, not copies:
- rsLoRA (Kalajdzievski 2023): ``s = alpha / sqrt(r)``.
- DoRA (Liu et al. 2024, arXiv 2402.09353): ``W' = m * V / ||V||`` with ``V = W0 + s B A``; ``m`` starts
  at ``||W0||`` (one value per output feature) and the norm is detached in backward (paper eq. 5).
- PiSSA / OLoRA: A and B start from the principal singular vectors / QR factors of W0; W0 keeps the rest.

Shapes: Linear A (r, d_in), B (d_out, r); Embedding A (r, num_embeddings), B (dim, r); Conv1d / 2d / 3d
A (r, c_in, *kernel) with the base's stride / padding / dilation, B (c_out, r / groups, 1, ...) (``conv``:
a grouped convolution's adapter cannot be merged).

This file is the reference path: init, delta, forward, merge, as the paper writes them. Beside it, the
same numbers faster: ``fast.py`` (one-pass and merged-weight forwards), ``kernels.py`` (their autograd
functions), ``batched.py`` (mixed-adapter batches); and the layer types: ``conv.py``, ``mha.py``
(``nn.MultiheadAttention``), ``dispatch.py`` (which adapter class a base gets).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, embed_scale, has_hooks, is_transposed, layer_dims
from ...layers import Adapter
from ...quant import dequantize_weight, guard_cpu_repack
from ...registry import register_method
from ...targeting import pattern_value
from . import batched as LB
from . import conv as LC
from . import dispatch
from . import fast as LFast
from . import functional as LF
from . import merging
from . import replication
from . import runtime
from . import moe as LMoe
from . import params as LP
from . import data_init, tying
from .config import LoraConfig
from .kernels import ScaleShift

_CONV = LC.CONV_TYPES


def _kind(base: nn.Module) -> str:
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, _CONV):
        return "conv"
    return "linear"


@register_method(
    "lora",
    config=LoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) per target, + d_out with DoRA",
    position="weight delta beside each targeted layer",
    paper="arXiv 2106.09685 (LoRA), 2402.09353 (DoRA), 2312.03732 (rsLoRA), 2404.02948 (PiSSA)",
    examples={
        "lora": {"r": 4, "lora_alpha": 8},
        "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
        "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
        "pissa": {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"},
    },
)
class LoraAdapter(dispatch.VariantHooks, Adapter):
    supported_layers = (nn.Linear, nn.Embedding, *_CONV) + CONV1D_TYPES
    default_roles = ("query", "value")

    def __new__(cls, base: Any = None, config: Any = None, *args: Any, **kwargs: Any) -> "LoraAdapter":
        # another adapter class for some bases (nn.MultiheadAttention, LoraConfig._register_custom_module:
        # methods/lora/dispatch.py) or for a layer tied to the input embedding (ensure_weight_tying: tied.py)
        own = cls is LoraAdapter
        sub = (tying.adapter_cls(config, *args, **kwargs) or dispatch.adapter_cls_for(base, config)) if own else None
        if sub is None or issubclass(sub, cls):
            return super().__new__(sub or cls)  # Python then runs sub.__init__ with the same arguments
        return sub(base, config, *args, **kwargs)  # an Adapter of its own: built whole here

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        paths = dispatch.select_targets(cls, model, named, config, extra=cls is LoraAdapter)
        paths = tying.with_tied(model, named, config, paths)  # ensure_weight_tying's tied layers (tying.py)
        data_init.check_prepared(named, paths, config)  # CorDA / LoRA-GA data on all targets or none
        return paths

    @classmethod
    def add_weighted_adapter(cls, model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                             **kwargs: Any) -> None:
        merging.add_weighted_adapter(model, adapters, weights, adapter_name, **kwargs)  # merging.py

    @classmethod
    def prepare_model(cls, model: nn.Module, config: Any) -> None:
        if config.layer_replication:
            replication.replicate_layers(model, config.layer_replication)  # replication.py

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        LMoe.convert_config(model, named, config)  # peft's rewrite for transformers 5's fused experts (moe.py)
        tying.prepare_config(model, config)  # ensure_weight_tying: peft's rewrite and warnings (tying.py)

    @classmethod
    def plan_parameters(cls, model: nn.Module, config: Any, adapter_name: str, paths: list[str],
                        init: bool) -> Any:
        return LP.plan(model, config, adapter_name, paths, init)  # target_parameters (params.py)

    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> Any:
        return dispatch.call_context(model, call)  # per-call state of variants (aLoRA's offsets: alora.py)

    def __init__(self, base: nn.Module, config: LoraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.kind = _kind(base)
        self.shares_base = bool(getattr(config, "layer_replication", None))  # merging is refused then
        self.key, self.groups = key, base.groups if self.kind == "conv" else 1
        self.r = r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        self.lora_alpha = alpha
        # alpha / r (rsLoRA: alpha / sqrt(r)); ``scaling`` is that times the weight a tool may set (set_scale)
        self.unit_scaling = self.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.fan_in_fan_out = is_transposed(base) or (
            self.kind == "linear" and config.fan_in_fan_out
        )
        w = base.weight
        if not w.is_floating_point():  # a bitsandbytes 4-/8-bit base (peftkit.quant)
            guard_cpu_repack(base)
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases (PEFT's autocast_adapter_dtype)
        factory = {"device": w.device, "dtype": dtype}
        d_out, d_in = self._dims(base)
        if self.kind == "conv":
            a_shape, b_shape = LC.factor_shapes(base, r, key)
        else:
            a_shape, b_shape = (r, d_in), (d_out, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        self.register_parameter("magnitude", None)
        self.register_parameter("bias_B", None)  # lora_bias: B's bias b, the adapter adds s (B A x + b)
        if config.lora_bias:
            if self.kind == "embedding":
                raise ValueError(f"{key}: lora_bias=True is not supported on embeddings (as in peft)")
            self.bias_B = nn.Parameter(torch.zeros(d_out, **factory))
            self.merged_params = ("weight", "bias")  # merging adds s b to the base bias (created if absent)
        self._cache: dict[str, tuple[tuple, Tensor]] = {}
        if init:
            self._init_weights(base, config, key)
        if config.use_dora:
            with torch.no_grad():
                norm = runtime.offloaded(config, self, base, self._full_norm)  # runtime_config (runtime.py)
            self.magnitude = nn.Parameter(norm.reshape(self._magnitude_shape(d_out)).to(dtype))

    # -- layout ----------------------------------------------------------------------------------------
    def _dims(self, base: nn.Module) -> tuple[int, int]:
        """(d_out, d_in); for an embedding (embedding_dim, num_embeddings)."""
        d_out, d_in = layer_dims(base)
        if self.kind == "linear" and self.fan_in_fan_out and not is_transposed(base):
            return d_in, d_out  # a plain Linear declared to store its weight (d_in, d_out)
        return d_out, d_in

    @property
    def _out_axis(self) -> int:
        """The axis of the base weight that indexes output features."""
        return 1 if self.fan_in_fan_out or self.kind == "embedding" else 0

    def _magnitude_shape(self, d_out: int) -> tuple[int, ...]:
        # PEFT's layout: (1, c_out, 1, ...) for conv, (d_out,) otherwise
        return (1, d_out) + (1,) * (self.lora_A.dim() - 2) if self.kind == "conv" else (d_out,)

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        if self.kind == "embedding":
            keys = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        else:
            keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
        if self.magnitude is not None:
            keys["magnitude"] = "lora_magnitude_vector"
        if self.bias_B is not None:
            keys["bias_B"] = "lora_B.bias"
        return keys

    @classmethod
    def param_count(cls, base: nn.Module, config: LoraConfig, key: str = "") -> int:
        """Closed form: r (d_in + d_out) (conv: r c_in prod(kernel) + c_out r / groups), + d_out with DoRA."""
        r = pattern_value(config.rank_pattern, key, config.r)
        d_out, d_in = layer_dims(base)
        count = LC.param_count(base, r) if isinstance(base, _CONV) else r * (d_in + d_out)
        return count + (d_out if config.use_dora else 0) + (d_out if config.lora_bias else 0)

    # -- init ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, base: nn.Module, config: LoraConfig, key: str) -> None:
        init = config.init_lora_weights
        A, B = self.lora_A, self.lora_B
        if init in data_init.DATA_INITS:  # orthogonal, eva, corda, lora_ga: data_init.py
            data_init.init_adapter(self, base, config)
            return
        if self.kind == "embedding" and init in (True, False, "gaussian"):
            # loralib's embedding init: A zero, B normal (False: both random, not the identity)
            nn.init.normal_(A) if init is False else nn.init.zeros_(A)
            nn.init.normal_(B)
            return
        if init is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        elif init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / self.r)
            nn.init.zeros_(B)
        else:
            self._init_from_weight(base, config)

    def _init_from_weight(self, base: nn.Module, config: LoraConfig) -> None:
        """PiSSA / OLoRA / LoftQ on the (d_out, d_in) matrix view of the base weight (a conv kernel is flattened).

        LoftQ writes its quantized weight Q (dequantized) into the base: quantize the model afterwards."""
        weight = base.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"PiSSA / OLoRA / LoftQ initialisation needs a float base weight, got {weight.dtype}: "
                            "initialise the adapter before quantizing the model (peftkit.quant.quantize_model)")
        if self.groups > 1:
            raise ValueError(f"{self.key}: PiSSA / OLoRA / LoftQ initialisation of a grouped convolution "
                             f"(groups={base.groups}) is not supported: its update is not in the weight's layout")
        transposed = self._out_axis == 1
        w = weight.float()
        w = w.t() if transposed else w.reshape(w.shape[0], -1)
        if config.init_lora_weights == "olora":
            A, B = LF.olora_factors(w, self.r)
        elif config.init_lora_weights == "loftq":
            A, B, residual = LF.loftq_factors(w, self.r, self.scaling, **config.loftq_options)
        else:
            A, B = LF.pissa_factors(w, self.r, self.scaling, config.pissa_niter)
        self.lora_A.copy_(A.reshape(self.lora_A.shape))
        self.lora_B.copy_(B.reshape(self.lora_B.shape))
        if config.init_lora_weights != "loftq":
            residual = w - self.scaling * (B @ A)
        weight.copy_((residual.t() if transposed else residual.reshape(weight.shape)).to(weight.dtype))

    # -- weights ---------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        """``s B A`` in the base weight's layout (a grouped convolution has none: ``conv.refuse_merge``)."""
        LC.refuse_merge(self.groups, self.key)
        delta = LF.lora_delta(self.lora_A, self.lora_B, self.scaling)
        return delta.t() if self.fan_in_fan_out or self.kind == "embedding" else delta

    def _full_norm(self, base: nn.Module) -> Tensor:
        """``||W0 + s B A||`` per output feature (detached by the callers)."""
        w = base.weight if base.weight.is_floating_point() else dequantize_weight(base)
        if self.kind == "linear":
            w0 = (w.t() if self.fan_in_fan_out else w).to(self.lora_A.dtype)
            return LF.dora_norm_lowrank(w0, self.lora_A, self.lora_B, self.scaling, self._w0_sq(w0))
        if self.kind == "conv":
            return LC.dora_norm(w.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling)
        return LF.norm_except(w.to(self.lora_A.dtype) + self.delta_weight(base), self._out_axis)

    def _w0_sq(self, w0: Tensor) -> Tensor:
        return self._cached("w0_sq", (w0,), lambda: LF.row_sq_norm(w0))

    def _cached(self, name: str, tensors: tuple[Tensor, ...], compute: Any) -> Tensor:
        # keyed on inference mode too: a value computed under torch.inference_mode() must not reach autograd.
        # A compiled graph computes the value in the graph: the key (data pointers, version counters) is
        # Python state dynamo cannot trace, and would break the graph (DoRA compiles with fullgraph=True)
        if torch.compiler.is_compiling():
            return compute()
        inference = torch.is_inference_mode_enabled()
        key = (self.scaling, inference, *((t.data_ptr(), t._version) for t in tensors))
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._cache[name] = (key, value)
        return value

    def _dora_scale(self, base: nn.Module) -> Tensor:
        """``m / ||W0 + s B A||`` with the norm detached; cached while not training."""
        training = self.training and torch.is_grad_enabled()  # read before no_grad turns it off
        with torch.no_grad():
            if training:
                norm = self._full_norm(base)
            else:
                norm = self._cached("norm", (base.weight, self.lora_A, self.lora_B), lambda: self._full_norm(base))
        return self.magnitude / norm.reshape(self.magnitude.shape)

    def train(self, mode: bool = True) -> "LoraAdapter":
        self._cache.clear()
        return super().train(mode)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        if self.shares_base:
            raise ValueError("Cannot merge LoRA layers when base model layers are replicated (layer_replication): the "
                             "copies share their base weights, so a merge into one would change the others")
        delta = self.delta_weight(base).to(weight.dtype)
        if self.magnitude is None:
            return weight + delta, None
        return LF.dora_merge(weight, delta, self.magnitude.to(weight.dtype), self._out_axis)

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        delta = self.delta_weight(base).to(weight.dtype)
        if self.magnitude is None:
            return weight - delta
        return LF.dora_unmerge(weight, delta, self.magnitude.to(weight.dtype), state, self._out_axis)

    # -- forward ---------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """The fast paths (``fast.py``): base and adapter in one pass, or one GEMM with ``W0 + s B A``."""
        return LFast.fused_forward(self, base, x)

    @classmethod
    def batched_forward(
        cls, adapters: list["LoraAdapter"], base: nn.Module, x: Tensor, out: Tensor, index: Tensor, cache: dict
    ) -> Tensor | None:
        """Mixed batch, BGMV style (``batched.py``)."""
        if cls.forward is not LoraAdapter.forward:  # a subclass with its own math brings its own batched path
            return None
        return LB.batched_lora(adapters, base, x, out, index, cache)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A = self.lora_A
        if self.kind == "embedding":
            return self._embedding_forward(base, x, out)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.kind == "conv":
            out = self._conv_forward(base, x, out)
            return out if self.bias_B is None else out + self._bias_term(out, channel_axis=1)
        h = F.linear(x, A)  # (..., r)
        if self.magnitude is not None:
            return self._dora_linear(base, h, out)
        if out.dtype != A.dtype:
            out = out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)
        else:
            out = self._accumulate(base, h, out)
        return out if self.bias_B is None else out + self._bias_term(out, channel_axis=-1)

    def _bias_term(self, out: Tensor, channel_axis: int) -> Tensor:
        """``s b`` shaped to broadcast over ``out`` (lora_bias)."""
        shape = [1] * out.dim()
        shape[channel_axis] = -1
        return (self.scaling * self.bias_B).to(out.dtype).view(shape)

    def merge_param(self, base: nn.Module, name: str, value: Tensor, sign: int = 1) -> Tensor:
        return value + sign * (self.scaling * self.bias_B).to(value.dtype)  # the base bias gains s b

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return self.merge_param(base, name, value, sign=-1)

    def missing_param(self, base: nn.Module, name: str) -> Tensor | None:
        return torch.zeros_like(self.bias_B, dtype=base.weight.dtype)  # a bias-free base gets one to merge into

    def _accumulate(self, base: nn.Module, h: Tensor, out: Tensor) -> Tensor:
        """``out + s h B^T`` as one GEMM with accumulation (in place when autograd is off and no hook
        can hold the base output)."""
        n = out.shape[-1]
        out2d, h2d = out.reshape(-1, n), h.reshape(-1, self.r)
        if not torch.is_grad_enabled() and not has_hooks(base):
            return out2d.addmm_(h2d, self.lora_B.t(), alpha=self.scaling).view(out.shape)
        return torch.addmm(out2d, h2d, self.lora_B.t(), alpha=self.scaling).view(out.shape)

    def _dora_linear(self, base: nn.Module, h: Tensor, out: Tensor) -> Tensor:
        t = self._accumulate(base, h, out.to(h.dtype)).view(-1, out.shape[-1])
        return self._dora_rescale(base, t).view(out.shape).to(out.dtype)

    def _dora_rescale(self, base: nn.Module, t: Tensor) -> Tensor:
        """DoRA on ``t = W0 x + b + s B A x`` (n, d_out): ``scale t + b (1 - scale)``, i.e.
        ``scale (W0 x + s B A x) + b`` with ``scale = m / ||W0 + s B A||``."""
        scale = self._dora_scale(base)
        bias = getattr(base, "bias", None)
        shift = None if bias is None else bias.to(t.dtype) * (1 - scale)
        return ScaleShift.apply(t, scale, shift)

    def _conv_forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        lora = LC.lora_output(x, self.lora_A, self.lora_B, base, self.scaling)
        if self.magnitude is None:
            return out + lora.to(out.dtype)
        return LC.dora_output(out, lora, self._dora_scale(base), base.bias)  # scale (1, c_out, 1, ...)

    def _embedding_forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        h = F.embedding(
            x, self.lora_A.t(), base.padding_idx,
            base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse,
        )
        lora = (h @ self.lora_B.t()) * self.scaling
        if self.magnitude is None:
            scale = embed_scale(base)  # a scaled embedding (Gemma) scales its rows in forward: the update too, as peft
            return out + (lora if scale is None else lora * scale.to(lora.dtype)).to(out.dtype)
        scale = self._dora_scale(base)
        return (out * scale + lora * scale).to(out.dtype)


