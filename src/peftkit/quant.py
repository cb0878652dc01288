"""Low-memory fine-tuning on a quantized base (QLoRA, Dettmers et al. 2023, arXiv 2305.14314).

The backend is bitsandbytes (``pip install 'peftkit[quant]'``): 4-bit NF4 with double quantization
(``Linear4bit``) and 8-bit LLM.int8 (``Linear8bitLt``). Both run on CPU here (bitsandbytes >= 0.45 ships a
CPU library) and on CUDA, and both subclass ``nn.Linear``, so every adapter that wraps a Linear accepts them:
the wrapper reads ``in_features`` / ``out_features`` (the packed weight has another shape), the base forward
dequantizes on the fly and only the adapters receive gradients.

- :func:`quantize_model` swaps ``nn.Linear`` layers for their bitsandbytes versions, one layer at a time (the
  fp32 copy of a layer is freed as soon as it is packed).
- :func:`prepare_model_for_kbit_training` is Hugging Face PEFT's helper of the same name.
- Merging into a quantized base (``AdapterLayer.merge`` routes here) dequantizes to fp32, adds the delta,
  re-quantizes and reports the error of that last step (:class:`QuantizationErrorWarning`, and
  ``base.merge_error``); unmerge puts the original packed weight back, bit for bit.

CPU trap (bitsandbytes 0.50, CPUs with AVX512-BF16): ``Linear4bit.forward`` in eval mode with an input that
needs no gradient repacks the weight into a CPU inference layout (``_convert_weight_packed_for_cpu``) and from
then on ``matmul_4bit`` takes the ``gemv_4bit`` kernel, which has no backward: no gradient flows back through
the base layers, the adapters of earlier layers get gradients through the residual stream only (wrong) and
training stalls. :func:`guard_cpu_repack` switches the repack off (``support_avx512bf16_for_cpu = False``)
and undoes one that already happened (the repack keeps the block scales in bf16, so the undone weight is
within bf16 rounding of the original; prevention is exact). :func:`quantize_model`,
:func:`prepare_model_for_kbit_training` and every LoRA adapter built on a 4-bit base call it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn

_Q4, _Q8 = "Params4bit", "Int8Params"


class QuantizationErrorWarning(UserWarning):
    """Re-quantizing a merged weight lost precision (the numbers are in the message and ``merge_error``)."""


def require_bnb() -> Any:
    """The bitsandbytes module, or an ImportError that says what to install."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "quantized base models need bitsandbytes: pip install 'peftkit[quant]' (or pip install bitsandbytes)"
        ) from err
    return bnb


def quant_bits(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes-quantized Linear, else None (never imports bitsandbytes)."""
    name = type(getattr(module, "weight", None)).__name__
    return 4 if name == _Q4 else 8 if name == _Q8 else None


def is_quantized(module: nn.Module) -> bool:
    return quant_bits(module) is not None


def _int8_state(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(CB int8 (d_out, d_in), SCB row scales) wherever Linear8bitLt keeps them at the moment."""
    w, state = module.weight, getattr(module, "state", None)
    cb = getattr(w, "CB", None)
    if cb is None and state is not None:
        cb = state.CB
    scb = getattr(w, "SCB", None)
    if scb is None and state is not None:
        scb = state.SCB
    return (w.data if cb is None else cb), scb


def dequantize_weight(module: nn.Module) -> Tensor:
    """The base weight as a float32 (d_out, d_in) tensor: dequantized for a quantized layer."""
    bits = quant_bits(module)
    if bits is None:
        return module.weight.float()
    bnb = require_bnb()
    if bits == 4:
        _unpack_cpu(module)
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    cb, scb = _int8_state(module)
    return cb.float() * (scb.float()[:, None] / 127.0)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a layer computes in (the adapters take it; fp32 for a quantized layer by default)."""
    w = module.weight
    if w.is_floating_point():
        return w.dtype
    return getattr(module, "compute_dtype", None) or torch.float32


# -- quantizing --------------------------------------------------------------------------------------------
def quantize_linear(
    linear: nn.Linear, bits: int = 4, *, quant_type: str = "nf4", double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A bitsandbytes copy of one ``nn.Linear`` (weights packed on the linear's device)."""
    bnb = require_bnb()
    device = linear.weight.device
    has_bias = linear.bias is not None
    with torch.device("meta"):  # no throw-away fp32 allocation for the new module's own init
        if bits == 4:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage)
        elif bits == 8:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=0.0)
        else:
            raise ValueError(f"bits={bits!r}: bitsandbytes quantizes to 4 or 8 bits")
    w = linear.weight.detach()
    if bits == 4:
        q.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, quant_storage=quant_storage, module=q)
        q.support_avx512bf16_for_cpu = False  # see guard_cpu_repack
    else:
        q.weight = bnb.nn.Int8Params(w.float(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype if bits == 4 else torch.float32),
                          requires_grad=False)
    q.train(linear.training)
    return q.to(device)  # packing happens here


def quantize_model(
    model: nn.Module, bits: int = 4, *, quant_type: str = "nf4", double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32, skip_modules: Iterable[str] = ("lm_head", "classifier", "score"),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a bitsandbytes 4-bit (NF4, double quant, as
    QLoRA) or 8-bit layer and return the model.

    Layers go one at a time, so the peak is one fp32 layer above the packed model. Modules whose name ends
    with an entry of ``skip_modules`` stay as they are (lm_head, as transformers does, and task heads, which
    usually train in full as ``modules_to_save``).
    Other layer types (GPT-2's Conv1D, convolutions; embeddings and norms stay silently) are not quantized,
    nor, on CPU, 4-bit Linears whose ``in_features`` is not a multiple of 64 (the block size: bitsandbytes
    0.50's CPU ``dequantize_4bit`` gets blocks that straddle rows wrong, errors of ~40% instead of ~10%).
    They are listed in a warning, and a model with no quantizable Linear raises ``ValueError`` naming them.
    """
    require_bnb()
    skip = tuple(skip_modules)
    done, left = 0, []
    for name, module in list(model.named_modules()):
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if type(module) is nn.Linear and bits == 4 and module.in_features % 64 and module.weight.device.type == "cpu":
            left.append(f"{name} (in_features={module.in_features} is not a multiple of 64: bitsandbytes 0.50's "
                        "CPU dequantize_4bit misreads blocks that straddle rows)")
        elif type(module) is nn.Linear:
            if module.weight.device.type == "meta":
                raise ValueError(f"{name}: weights are on the meta device; materialize them before quantize_model")
            _replace(model, name, quantize_linear(module, bits, quant_type=quant_type, double_quant=double_quant,
                                                  compute_dtype=compute_dtype))
            done += 1
        elif _weighted(module) and not is_quantized(module) and not isinstance(module, (nn.Embedding, nn.LayerNorm)):
            left.append(f"{name} ({type(module).__name__})")
    if not done:
        raise ValueError(f"quantize_model: no nn.Linear layer to quantize to {bits}-bit; "
                         f"bitsandbytes cannot quantize: {', '.join(left) or 'nothing found'}")
    if left:
        warnings.warn(f"quantize_model: left in full precision: "
                      f"{', '.join(left[:8])}{' ...' if len(left) > 8 else ''}", stacklevel=2)
    model.quantization_bits = bits
    return model


def _weighted(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.dim() >= 2 and not list(module.children())


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# -- the CPU repack trap -----------------------------------------------------------------------------------
def _unpack_cpu(module: nn.Module) -> bool:
    """Switch off the AVX512-BF16 inference repack of one Linear4bit and undo it if it happened."""
    if quant_bits(module) != 4:
        return False
    module.support_avx512bf16_for_cpu = False
    w = module.weight
    if not getattr(w.quant_state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    module.quant_state = w.quant_state
    return True


def guard_cpu_repack(model: nn.Module) -> int:
    """Make every 4-bit layer of ``model`` trainable after inference passes (see the module docstring).

    Returns how many layers had been repacked already and were restored."""
    return sum(_unpack_cpu(m) for m in model.modules())


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None, auto_clear_cache: bool = True,
) -> nn.Module:
    """Hugging Face PEFT's helper: freeze every parameter, upcast fp16/bf16 non-quantized parameters (norms,
    embeddings, head) to fp32, make the input embeddings' output require grad (so checkpointed blocks have a
    graph to recompute) and switch on gradient checkpointing (non-reentrant unless told otherwise).
    ``auto_clear_cache``: empty the accelerator's caching allocator after the upcasts (CUDA / XPU, as peft)."""
    guard_cpu_repack(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if is_quantized(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if auto_clear_cache:  # the fp16 -> fp32 copies leave freed blocks in the allocator's cache
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            torch.xpu.empty_cache()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# -- merging into a quantized base ----------------------------------------------------------------------
def requantize_like(module: nn.Module, weight: Tensor) -> nn.Parameter:
    """``weight`` (d_out, d_in) packed with ``module``'s own quantization settings."""
    bnb = require_bnb()
    old = module.weight
    if quant_bits(module) == 4:
        dtype = getattr(module, "compute_dtype", None) or torch.float32
        new = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=module)
    else:
        new = bnb.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False)
    return new.to(old.device)


def _snapshot(module: nn.Module) -> tuple[nn.Parameter, Any]:
    """The packed weight and, for Linear8bitLt, the int8 matrix and scales its matmul state holds."""
    state = getattr(module, "state", None)
    return module.weight, (None if state is None or quant_bits(module) == 4 else (state.CB, state.SCB))


def _install(module: nn.Module, param: nn.Parameter, int8_state: Any = None) -> None:
    module.weight = param
    if quant_bits(module) == 4:
        module.quant_state = param.quant_state
    elif getattr(module, "state", None) is not None:  # None: the new Int8Params carries CB / SCB itself
        module.state.CB, module.state.SCB = int8_state or (None, None)


def merge_quantized(layer: Any, names: list[str], safe_merge: bool = False) -> dict[str, dict[str, float]]:
    """``AdapterLayer.merge`` for a quantized base: dequantize to fp32, merge, re-quantize explicitly.

    Returns ``{adapter: {"max_abs": ..., "rel": ...}}``, the error of the re-quantization (dequantized result
    minus the exact fp32 merge; ``rel`` divides by the largest merged entry), also kept on the base layer as
    ``merge_error`` and announced with a :class:`QuantizationErrorWarning`."""
    base = layer.base_layer
    report = {}
    for name in names:
        if name not in layer.adapters:
            continue
        if name in layer.merged_adapters:
            warnings.warn(f"adapter {name!r} is already merged; skipping", stacklevel=3)
            continue
        adapter = layer.adapters[name]
        original = _snapshot(base)
        merged, _ = adapter.merge(base, dequantize_weight(base))
        others = {}
        for pname in adapter.merged_params:  # e.g. a bias: plain float, merged as usual
            value = getattr(base, pname, None)
            if pname != "weight" and value is not None:
                others[pname] = (value, value.detach().clone(), adapter.merge_param(base, pname, value.detach()))
        finite = torch.isfinite(merged).all() and all(torch.isfinite(m).all() for *_, m in others.values())
        if safe_merge and not finite:
            raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base; nothing merged")
        new = requantize_like(base, merged)
        _install(base, new)
        with torch.no_grad():
            for param, _, value in others.values():
                param.copy_(value)
        err = (dequantize_weight(base) - merged).abs().max().item()
        scale = merged.abs().max().item()
        report[name] = {"max_abs": err, "rel": err / scale if scale else 0.0}
        layer._restore[name] = {"__quantized__": (original, {p: old for p, (_, old, _) in others.items()})}
        layer.merged_adapters.append(name)
        if err > 0 and math.isfinite(err):
            warnings.warn(
                f"merged adapter {name!r} into a {quant_bits(base)}-bit base and re-quantized it: max abs error "
                f"{err:.3g} ({report[name]['rel']:.2%} of the largest weight); unmerge restores the original",
                QuantizationErrorWarning, stacklevel=3)
    base.merge_error = {**getattr(base, "merge_error", {}), **report}
    return report


def unmerge_quantized(layer: Any, names: list[str] | None = None) -> None:
    """Undo :func:`merge_quantized`: the original packed weight (and biases) come back exactly."""
    base = layer.base_layer
    names = list(layer.merged_adapters) if names is None else names
    for name in reversed(list(layer.merged_adapters)):
        if name not in names:
            continue
        if layer.merged_adapters[-1] != name:
            raise RuntimeError(f"unmerge {layer.merged_adapters[-1]!r} before {name!r} (merges undo in reverse)")
        original, others = layer._restore.pop(name)["__quantized__"]
        _install(base, *original)
        with torch.no_grad():
            for pname, value in others.items():
                getattr(base, pname).copy_(value)
        layer.merged_adapters.pop()


def merge_errors(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """Every quantized layer's ``merge_error``, by module path (after ``merge_and_unload`` too)."""
    return {n: m.merge_error for n, m in model.named_modules() if getattr(m, "merge_error", None)}
