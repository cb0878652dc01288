"""LoRA initialisations beyond the weight's own SVD, each as in Hugging Face PEFT 0.21.2:

- ``"orthogonal"``: A and B from the odd and even rows of one random orthogonal r x r matrix (r even); the base
  weight is untouched and the adapter starts non-zero (not the identity), as peft.
- ``"eva"`` (``eva.py``): a placeholder here (Kaiming A, zero B: the base model's outputs) until
  ``initialize_lora_eva_weights`` writes the data-driven A and redistributes the ranks.
- ``"corda"`` (``corda.py``): A and B from the factors ``preprocess_corda`` left on each layer (``eigens``); the
  base weight keeps ``W - s B A``, so the model starts from its own outputs.
- ``"lora_ga"`` (``loraga.py``): A and B from the SVD of the gradient ``preprocess_loraga`` left on each layer
  (``_peft_loraga_grad``); the base weight keeps ``W - s B A``.

peft builds lora_A and lora_B as ``nn.Linear`` modules, each drawing a Kaiming init from the CPU generator,
before an initialisation replaces them; the random inits here draw the same first (``_draw_like_peft``), so a
seeded model's factors equal peft's. Embeddings take loralib's init (A zero, B normal) and convolutions refuse
all but "lora_ga" (which falls back to the default init there), as in peft.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES
from ...targeting import pattern_value
from . import corda as CD
from . import loraga as GA

DATA_INITS = ("orthogonal", "eva", "corda", "lora_ga")
_PREPARED = {"corda": ("eigens", "preprocess_corda"), "lora_ga": ("_peft_loraga_grad", "preprocess_loraga")}


def orthogonal_factors(d_in: int, d_out: int, r: int) -> tuple[Tensor, Tensor]:
    """peft's ``orthogonal_init`` (https://datta0.github.io/posts/rethink-lora-init/): Q from the QR of an r x r
    normal matrix; A (r, d_in) = (N1 Q[0::2])^T / 10, B (d_out, r) = N2^T Q[1::2] / 10, N1, N2 normal (CPU
    generator, in this order)."""
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(d_in, r // 2).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, d_out).T.mm(Q[1::2, :]) / 10.0
    return A.contiguous(), B.contiguous()


def _draw_like_peft(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    """Advance the CPU generator as peft's ``nn.Linear(d_in, r)`` and ``nn.Linear(r, d_out)`` constructors do."""
    nn.init.kaiming_uniform_(torch.empty(a_shape), a=math.sqrt(5))
    nn.init.kaiming_uniform_(torch.empty(b_shape), a=math.sqrt(5))


def _default_init(adapter: Any) -> None:
    """peft's ``init_lora_weights=True`` after its layer construction: Kaiming A (CPU generator), zero B."""
    A = adapter.lora_A
    A.copy_(nn.init.kaiming_uniform_(torch.empty(A.shape), a=math.sqrt(5)))
    nn.init.zeros_(adapter.lora_B)


def _matrix(adapter: Any, weight: Tensor) -> tuple[Tensor, bool]:
    """The base weight as a float32 (d_out, d_in) matrix, and whether it is stored transposed (GPT-2 Conv1D)."""
    transposed = adapter._out_axis == 1
    w = weight.float()
    return (w.t() if transposed else w), transposed


def _write_residual(adapter: Any, weight: Tensor, residual: Tensor, transposed: bool) -> None:
    weight.copy_((residual.t() if transposed else residual).to(weight.dtype))


@torch.no_grad()
def init_adapter(adapter: Any, base: nn.Module, config: Any) -> None:
    """Initialise ``adapter`` (a LoraAdapter on ``base``) for ``config.init_lora_weights`` in ``DATA_INITS``."""
    init = config.init_lora_weights
    if adapter.kind == "embedding":  # peft: every such init gives loralib's embedding init
        nn.init.zeros_(adapter.lora_A)
        nn.init.normal_(adapter.lora_B)
        return
    if adapter.kind == "conv":
        if init == "lora_ga":  # peft: convolutions fall back to the default init
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
            nn.init.zeros_(adapter.lora_B)
            return
        raise ValueError(f"{adapter.key}: init_lora_weights={init!r} is not supported on convolution layers (as in "
                         "peft, which supports it on Linear / Conv1D layers only); leave this layer out of "
                         "target_modules")
    d_out, d_in = adapter._dims(base)
    a_shape, b_shape = (adapter.r, d_in), (d_out, adapter.r)
    if init == "eva":  # peft keeps its nn.Linear's Kaiming A (the first draw) and zeroes B (drawn second)
        A = nn.init.kaiming_uniform_(torch.empty(a_shape), a=math.sqrt(5))
        nn.init.kaiming_uniform_(torch.empty(b_shape), a=math.sqrt(5))
        adapter.lora_A.copy_(A)
        nn.init.zeros_(adapter.lora_B)
    elif init == "orthogonal":
        _draw_like_peft(a_shape, b_shape)
        A, B = orthogonal_factors(d_in, d_out, adapter.r)
        dtype = base.weight.dtype if base.weight.is_floating_point() else A.dtype
        adapter.lora_A.copy_(A.to(dtype))  # peft casts to the base's dtype (then its autocast to float32)
        adapter.lora_B.copy_(B.to(dtype))
    elif init == "corda":
        _init_corda(adapter, base, config)
    else:
        _init_lora_ga(adapter, base, config, a_shape, b_shape)


def _init_corda(adapter: Any, base: nn.Module, config: Any) -> None:
    weight = base.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("Please initialize CorDA under float32, float16, or bfloat16. Subsequently, re-quantize the "
                        "residual model to help minimize quantization errors.")
    if not hasattr(base, "eigens"):
        raise ValueError(f"{adapter.key}: init_lora_weights='corda' needs the layer's CorDA factors (`eigens`), "
                         "which preprocess_corda(model, lora_config, run_model=...) attaches: call it on the model "
                         "with this LoraConfig before get_peft_model (see peftkit.preprocess_corda)")
    d_out, d_in = adapter._dims(base)
    CD.check_eigens(base.eigens, d_out, d_in, adapter.r, adapter.key)
    A, B = CD.corda_factors(base.eigens, adapter.scaling)
    w, transposed = _matrix(adapter, weight)
    adapter.lora_A.copy_(A)
    adapter.lora_B.copy_(B)
    _write_residual(adapter, weight, w - adapter.scaling * B @ A, transposed)
    del base.eigens


def _init_lora_ga(adapter: Any, base: nn.Module, config: Any, a_shape: tuple, b_shape: tuple) -> None:
    _draw_like_peft(a_shape, b_shape)
    if not hasattr(base, "_peft_loraga_grad"):
        # peft's behaviour (its loading path builds the layer with this init): the default init, base untouched
        warnings.warn("init_lora_weights='lora_ga': no gradient from preprocess_loraga on this layer, so it gets the "
                      "default init (Kaiming A, zero B) and its base weight is unchanged; call "
                      "preprocess_loraga(model, lora_config, train_step) before get_peft_model to use LoRA-GA",
                      stacklevel=2)
        _default_init(adapter)
        return
    if config.lora_ga_config is None:
        raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. "
                         "Please pass lora_ga_config=LoraGAConfig(...) to LoraConfig.")
    weight = base.weight
    dtype = weight.dtype
    w, transposed = _matrix(adapter, weight)
    grad = base._peft_loraga_grad.to(torch.float32)
    grad = grad.t() if transposed else grad
    A, B = GA.loraga_factors(grad, w, adapter.r, adapter.scaling, config.lora_ga_config, weight.shape[0])
    A, B = A.to(dtype), B.to(dtype)
    adapter.lora_A.copy_(A)
    adapter.lora_B.copy_(B)
    _write_residual(adapter, weight, w - adapter.scaling * (B.float() @ A.float()), transposed)
    del base._peft_loraga_grad


def check_prepared(named: list[tuple[str, nn.Module]], paths: list[str], config: Any) -> None:
    """Before any layer is built: CorDA / LoRA-GA data on some targeted Linear / Conv1D layers but not all (or of
    the wrong shape) is an error, so a mismatch between the preprocessing and ``get_peft_model`` leaves the model
    untouched. Data on none is left to the layers: loading needs none, a fresh CorDA init refuses at its first
    layer (before changing anything) and LoRA-GA falls back to the default init, as peft."""
    init = getattr(config, "init_lora_weights", None)
    if init not in _PREPARED:
        return
    attr, fn = _PREPARED[init]
    modules = dict(named)
    linear = [p for p in paths if isinstance(modules[p], (nn.Linear, *CONV1D_TYPES))]
    have = [p for p in linear if hasattr(modules[p], attr)]
    if not have:
        return
    missing = [p for p in linear if p not in have]
    if missing:
        raise ValueError(f"init_lora_weights={init!r}: {fn} prepared {len(have)} of the {len(linear)} targeted layers "
                         f"(no `{attr}` on {missing[:5]}); run {fn} with the same model and LoraConfig "
                         "(target_modules, rank_pattern) as get_peft_model")
    if init == "lora_ga" and config.lora_ga_config is None:
        raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. "
                         "Please pass lora_ga_config=LoraGAConfig(...) to LoraConfig.")
    if init == "corda":
        for p in linear:
            w = modules[p].weight
            d_out, d_in = (w.shape[1], w.shape[0]) if isinstance(modules[p], CONV1D_TYPES) else tuple(w.shape)
            CD.check_eigens(modules[p].eigens, d_out, d_in, pattern_value(config.rank_pattern, p, config.r), p)
