"""CorDA (Yang et al. 2024, arXiv 2406.05223), as Hugging Face PEFT 0.21.2 (``peft.tuners.lora.corda``).

``preprocess_corda(model, lora_config, run_model=...)`` runs the model on calibration data, collects each
targeted Linear / Conv1D layer's input covariance C, and leaves on the layer (``module.eigens``) the factors of
the SVD of ``W C``: ``W C = U S V^T``, ``V_WC = (V^T C^-1)^T``, cropped to the rank: the largest r components
in IPM (instruction-previewed mode), the smallest r in KPM (knowledge-preserved mode). ``get_peft_model`` with
``init_lora_weights="corda"`` then sets ``A = sqrt(S / s) V_WC^T``, ``B = U sqrt(S / s)`` and the base weight
to ``W - s B A`` (``data_init.py``), so the model starts from its own outputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES
from ...registry import get_method
from ...targeting import pattern_value
from . import dispatch

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm comes with transformers
    tqdm = None


@dataclasses.dataclass
class CordaEigens:
    S_WC: Tensor
    U_WC: Tensor
    V_WC: Tensor


def target_modules(model: nn.Module, config: Any) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the Linear / Conv1D layers ``config`` targets in ``model`` (peftkit's targeting rules,
    the same ``get_peft_model`` applies; data left on the layers by an earlier preprocessing is not checked)."""
    named = list(model.named_modules())
    paths = set(dispatch.select_targets(get_method(config).adapter_cls, model, named, config, extra=True))
    for name, module in named:
        if name in paths and isinstance(module, (nn.Linear, *CONV1D_TYPES)):
            yield name, module


def _device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)  # DeepSpeed / DataParallel
    return next(iter(model.parameters())).device


def _matrix(module: nn.Module) -> Tensor:
    """The weight as float32 (d_out, d_in) (GPT-2's Conv1D stores (d_in, d_out))."""
    w = module.weight.data.float()
    return w.T if isinstance(module, CONV1D_TYPES) else w


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Optional[Callable[[], None]] = None,
    hooked_model: Optional[nn.Module] = None,
) -> None:
    """Attach CorDA's factors (``eigens``) to every targeted Linear / Conv1D layer of ``model`` (peft's API).

    Args:
        model: the model ``get_peft_model`` will adapt next, with this ``lora_config``.
        lora_config: a LoraConfig with ``init_lora_weights="corda"`` (its ``corda_config``: mode, cache files).
        run_model: runs the model on the calibration data (``lambda: [model(**b) for b in batches]``); may be None
            only when ``corda_config.cache_file`` or ``covariance_file`` already exists.
        hooked_model: collect the covariances on this model instead (same module names).
    """
    cfg = lora_config.corda_config
    if cfg is None:
        raise ValueError("preprocess_corda: lora_config.corda_config is None; build the LoraConfig with "
                         "init_lora_weights='corda' (which sets the default CordaConfig) or pass corda_config")
    if cfg.cache_file is not None and os.path.exists(cfg.cache_file) and os.path.getsize(cfg.cache_file) > 0:
        cache = torch.load(cfg.cache_file, map_location=_device(model))
        for name, module in target_modules(model, lora_config):
            module.eigens = CordaEigens(S_WC=cache[f"{name}.eigens.S_WC"], U_WC=cache[f"{name}.eigens.U_WC"],
                                        V_WC=cache[f"{name}.eigens.V_WC"])
        return
    if cfg.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    if cfg.corda_method not in ("ipm", "kpm"):
        raise ValueError(f"CordaConfig.corda_method: expected 'ipm' or 'kpm', got {cfg.corda_method!r}")
    targets = list(target_modules(model, lora_config))
    calib_cov_distribution(model, lora_config, run_model, hooked_model, cfg.covariance_file)
    items = tqdm(targets, desc="Collecting eigens") if cfg.verbose and tqdm is not None else targets
    for name, module in items:
        rank = pattern_value(lora_config.rank_pattern, name, lora_config.r)
        eigens = collect_eigens_for_layer(module.weight, module.covariance_matrix, _matrix(module))
        module.eigens = crop_eigens(eigens, rank, cfg.corda_method, _device(model))
        if cfg.prune_temporary_fields:
            for field in ("sample_count", "covariance_matrix"):
                if hasattr(module, field):
                    delattr(module, field)
    if cfg.cache_file is not None:
        cache = {}
        for name, module in targets:
            for key in ("S_WC", "U_WC", "V_WC"):
                cache[f"{name}.eigens.{key}"] = getattr(module.eigens, key)
        os.makedirs(os.path.dirname(cfg.cache_file), exist_ok=True)
        torch.save(cache, cfg.cache_file)


def covariance_hook(use_float16: bool) -> Callable:
    """The forward hook that adds ``X^T X`` of a layer's input (scaled by its maximum) to the layer's sum.
    peft takes ``input.squeeze(0)`` as the (tokens, d_in) matrix (batches of one); here any leading dimensions
    are flattened, which is the same for those and also accepts larger batches."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach().squeeze(0)
        x = x.reshape(-1, x.shape[-1])
        if not use_float16:
            x = x.float()
        x = x / torch.max(x).abs()
        if torch.isnan(x).any() or torch.isinf(x).any():
            raise ValueError("Invalid value found in input, please check your input data.")
        covariance = x.t().matmul(x)
        if torch.isnan(covariance).any() or torch.isinf(covariance).any():
            raise ValueError("Invalid value found in covariance (CorDA): check the calibration data and dtype "
                             "(use_float16_for_covariance=False accumulates in float32).")
        module.sample_count += 1
        module.covariance_matrix += covariance

    return hook


@torch.no_grad()
def calib_cov_distribution(model: nn.Module, config: Any, run_model: Optional[Callable[[], None]],
                           hooked_model: Optional[nn.Module], covariance_file: Optional[str]) -> None:
    """Each target's mean input covariance as ``module.covariance_matrix`` (read from ``covariance_file`` when it
    exists, else collected while ``run_model()`` runs, and written there)."""
    if covariance_file is not None and os.path.exists(covariance_file) and os.path.getsize(covariance_file) > 0:
        saved = torch.load(covariance_file, map_location=_device(model))
        for name, module in target_modules(model, config):
            module.covariance_matrix = saved[name]
        return
    if run_model is None:
        raise ValueError("preprocess_corda: run_model must be given (a callable that runs the model on calibration "
                         "data) when the covariance file and cache file aren't built.")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    hook = covariance_hook(config.corda_config.use_float16_for_covariance)
    handles = []
    hooked_targets = list(target_modules(hooked, config))
    for _, module in hooked_targets:
        module.sample_count = 0
        module.covariance_matrix = 0
        handles.append(module.register_forward_hook(hook))
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    targets = dict(target_modules(model, config))
    if hooked is not model:
        for name, module in hooked_targets:
            if name in targets:
                targets[name].sample_count = module.sample_count
                targets[name].covariance_matrix = module.covariance_matrix
    for name, module in targets.items():
        if not module.sample_count:
            raise ValueError(f"preprocess_corda: layer {name!r} saw no input while run_model() ran; the calibration "
                             "run must call the model (every targeted layer) at least once")
        module.covariance_matrix /= module.sample_count
    if covariance_file is not None:
        os.makedirs(os.path.dirname(covariance_file), exist_ok=True)
        torch.save({name: m.covariance_matrix for name, m in targets.items()}, covariance_file)


@torch.no_grad()
def collect_eigens_for_layer(weight: Tensor, covariance: Tensor, w: Tensor | None = None) -> CordaEigens:
    """The SVD of ``W C`` (C damped until it inverts well), ``V_WC = (V^T C^-1)^T``: peft's numerics, full rank.
    ``w``: the (d_out, d_in) float32 view of ``weight`` (default: ``weight`` itself)."""
    w = weight.data.float() if w is None else w
    covariance = covariance.float()
    n = covariance.size(0)
    damp = 0.01
    while True:
        compensate = torch.diag(torch.ones(n).to(covariance.device) * torch.mean(torch.diag(covariance)) * damp)
        fixed = covariance + compensate
        cov_inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ cov_inv, torch.eye(n).to(weight.device)).item() < 0.05:
            break
        damp = damp * 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ cov_inv).transpose(0, 1)
    return CordaEigens(S_WC=S, U_WC=U.cpu(), V_WC=V.cpu())


def crop_eigens(eigens: CordaEigens, rank: int, method: str, device: torch.device) -> CordaEigens:
    """The largest ``rank`` components (IPM) or the smallest (KPM), as copies."""
    if method == "ipm":
        part = slice(None, rank)
    elif method == "kpm":
        part = slice(-rank, None)
    else:
        raise ValueError(f"Invalid corda_method found: {method}, it should be 'ipm' or 'kpm'.")
    return CordaEigens(S_WC=eigens.S_WC[part].clone(), U_WC=eigens.U_WC[:, part].clone().to(device),
                       V_WC=eigens.V_WC[:, part].clone().to(device))


def check_eigens(eigens: Any, d_out: int, d_in: int, r: int, where: str) -> None:
    """peft's checks of a layer's factors: finite, U (d_out, r), S (r,), V (d_in, r)."""
    for label, t in (("S", eigens.S_WC), ("U", eigens.U_WC), ("V", eigens.V_WC)):
        if torch.isnan(t).any() or torch.isinf(t).any():
            raise ValueError(f"{where}: invalid value (nan / inf) in CorDA's matrix {label}")
    hint = ("Please make sure the `lora_config` and `model` argument of `preprocess_corda` is consistent with "
            "`get_peft_model`. If you're using cache in `preprocess_corda`, please make sure the cache is built with "
            "the same model and LoRA rank.")
    if tuple(eigens.U_WC.shape) != (d_out, r):
        raise ValueError(f"{where}: Matrix U size mismatch: {tuple(eigens.U_WC.shape)} vs. ({d_out}, {r}). {hint}")
    if tuple(eigens.S_WC.shape) != (r,):
        raise ValueError(f"{where}: Matrix S size mismatch: {tuple(eigens.S_WC.shape)} vs. ({r},). {hint}")
    if tuple(eigens.V_WC.shape) != (d_in, r):
        raise ValueError(f"{where}: Matrix V size mismatch: {tuple(eigens.V_WC.shape)} vs. ({d_in}, {r}). {hint}")


def corda_factors(eigens: CordaEigens, scaling: float) -> tuple[Tensor, Tensor]:
    """``A = sqrt(S / s) V^T`` (r, d_in), ``B = U sqrt(S / s)`` (d_out, r): ``s B A = U S V^T``."""
    S = eigens.S_WC / scaling
    A = eigens.V_WC.t().mul(S.sqrt().view(-1, 1)).contiguous()
    B = eigens.U_WC.mul(S.sqrt()).contiguous()
    return A, B


__all__ = ["CordaEigens", "preprocess_corda"]
