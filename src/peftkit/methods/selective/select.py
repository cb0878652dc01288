"""Which base parameters a selective method may change, and exact global top-k selection among them.

Pure functions over a model's modules and score tensors; nothing here holds state.
"""

from __future__ import annotations

import types
import zlib
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from ...saved_modules import TASK_HEADS
from ...targeting import is_target
from .config import SelectionError

# (module path, parameter name, parameter)
Candidate = tuple[str, str, nn.Parameter]


def task_heads(config: Any) -> list[str]:
    """``modules_to_save`` plus the task head the engine adds for classification task types."""
    heads = list(getattr(config, "modules_to_save", None) or [])
    return heads + [h for h in TASK_HEADS.get(getattr(config, "task_type", None), []) if h not in heads]


def shared_params(model: nn.Module) -> set[int]:
    """ids of parameters reachable through more than one module path (tied embeddings, shared modules).

    A delta on such a parameter would reach only one of its users before merging and all of them after,
    so selective methods leave them alone.
    """
    owners: dict[int, set[str]] = defaultdict(set)
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)].add(path)
    return {pid for pid, paths in owners.items() if len(paths) > 1}


def own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A leaf module's own parameters; [] for a container (parameters held next to submodules that hold
    parameters, such as ViT's ``cls_token``, are not selectable)."""
    if any(any(True for _ in child.parameters()) for child in module.children()):
        return []
    return [(n, p) for n, p in module._parameters.items() if p is not None]


def eligible(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    config: Any,
    *,
    only: tuple[str, ...] | None = None,
) -> list[Candidate]:
    """Parameters ``config`` may select: own parameters of targeted leaf modules, outside the task head and
    ``modules_to_save``, not shared between modules. ``only`` restricts parameter names (e.g. ``("bias",)``)."""
    view = types.SimpleNamespace(
        exclude_modules=getattr(config, "exclude_modules", None), modules_to_save=task_heads(config)
    )
    targets = getattr(config, "target_modules", None)
    shared = shared_params(model)
    out = []
    for path, module in named:
        if not path:
            continue
        if targets is None:
            if not is_target(view, path, [path]):
                continue
        elif not is_target(view, path, targets if isinstance(targets, str) else set(targets)):
            continue
        for pname, p in own_params(module):
            if (only is None or pname in only) and id(p) not in shared:
                out.append((path, pname, p))
    return out


# -- formats ----------------------------------------------------------------------------------------------
def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def choose_format(numel: int, nnz: int, itemsize: int) -> str:
    """``full`` when every entry is selected, else the smaller of indices + values and delta + bool mask."""
    if nnz >= numel:
        return "full"
    idx_bytes = torch.empty((), dtype=index_dtype(numel)).element_size()
    return "sparse" if nnz * (idx_bytes + itemsize) <= numel * (itemsize + 1) else "masked"


def delta_dtype(param: Tensor) -> torch.dtype:
    """Deltas of half-precision weights train in float32."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def record(entries: list[tuple[str, str, tuple[int, ...], int, str]]) -> dict[str, dict[str, Any]]:
    """``selected_params`` for (path, param, shape, nnz, format) entries."""
    return {f"{p}.{n}": {"shape": list(shape), "nnz": int(nnz), "format": fmt} for p, n, shape, nnz, fmt in entries}


def entries_for(config: Any, path: str) -> dict[str, dict[str, Any]] | None:
    """This module's entries of ``config.selected_params`` (param name -> spec), None when not selected yet."""
    selected = getattr(config, "selected_params", None)
    if selected is None:
        return None
    prefix = path + "."
    return {k[len(prefix):]: v for k, v in selected.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


def check_fits(named: list[tuple[str, nn.Module]], selected: dict[str, dict[str, Any]]) -> list[str]:
    """Module paths of a recorded selection, after checking every parameter exists with the recorded shape."""
    modules = dict(named)
    paths: list[str] = []
    for key, spec in selected.items():
        path, _, pname = key.rpartition(".")
        module = modules.get(path)
        param = None if module is None else module._parameters.get(pname)
        recorded = tuple(spec["shape"])
        if param is None:
            raise SelectionError(
                f"the adapter changes parameter {key!r} (shape {recorded}), which this model does not have; "
                "it was saved for a different model"
            )
        if tuple(param.shape) != recorded:
            raise SelectionError(
                f"parameter {key!r} has shape {tuple(param.shape)} in this model but {recorded} in the adapter; "
                "it was saved for a different model"
            )
        if path not in paths:
            paths.append(path)
    return paths


# -- top-k ------------------------------------------------------------------------------------------------
def target_count(total: int, density: float | None = None, top_k: int | None = None) -> int:
    """``round(density * total)`` (or ``top_k``) entries, checked to be between 1 and ``total``."""
    k = top_k if top_k is not None else round(density * total)
    if not 1 <= k <= total:
        what = f"top_k={top_k}" if top_k is not None else f"density={density}"
        raise SelectionError(f"{what} keeps {k} of the {total:,d} targeted entries; expected between 1 and {total:,d}")
    return k


def _top(scores: Tensor, threshold: Tensor, ties: int) -> Tensor:
    """Flat indices of entries above ``threshold`` plus the first ``ties`` entries equal to it, sorted."""
    flat = scores.reshape(-1)
    above = (flat > threshold).nonzero().squeeze(1)
    if ties > 0:
        above = torch.cat([above, (flat == threshold).nonzero().squeeze(1)[:ties]]).sort().values
    return above


def top_n(scores: Tensor, n: int) -> Tensor:
    """Flat indices of the ``n`` largest entries (ties: lowest index first), sorted."""
    flat = scores.reshape(-1)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    t = flat.topk(n).values[-1]
    return _top(flat, t, n - int((flat > t).sum()))


def global_top_k(scores: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """The ``k`` largest entries over all score tensors together: name -> sorted flat indices (names with
    none selected are left out). Ties at the threshold go to the earlier tensor, then the lower index."""
    if any(not torch.isfinite(s).all() for s in scores.values()):
        bad = next(n for n, s in scores.items() if not torch.isfinite(s).all())
        raise SelectionError(f"scores of {bad!r} contain NaN or inf; no mask was chosen")
    # the k-th largest overall is among each tensor's own top k: candidates stay small
    best = torch.cat([s.reshape(-1).float().topk(min(k, s.numel())).values.cpu() for s in scores.values()])
    threshold = best.topk(k).values[-1]
    ties = k - int((best > threshold).sum())
    out: dict[str, Tensor] = {}
    for name, s in scores.items():
        flat = s.reshape(-1).float()
        equal = int((flat == threshold.to(flat.device)).sum())
        take = min(ties, equal)
        ties -= take
        idx = _top(flat, threshold.to(flat.device), take)
        if idx.numel():
            out[name] = idx
    return out


def random_scores(key: str, shape: tuple[int, ...], seed: int, device: Any = "cpu") -> Tensor:
    """Reproducible uniform scores for one parameter (the random-mask baseline), keyed by its name."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    return torch.rand(shape, generator=g).to(device)
