"""FISH mask (Sung, Nair, Raffel 2021, arXiv 2111.09839), and the fixed-mask machinery Child-Tuning D shares.

The mask keeps the ``round(density * N)`` entries with the largest empirical Fisher information over all
targeted parameters together, chosen once before training. Only those entries are trainable tensors
(``values`` at fixed ``indices``, or a dense delta times a fixed boolean mask when that is smaller), so the
gradient outside the mask is zero by construction and the optimizer state is the size of the mask.

Two steps, since the mask depends on data:

    model = get_peft_model(base, FishMaskConfig(density=0.005, task_type="SEQ_CLS"))
    model.prepare_selection(train_loader, loss_fn)   # Fisher over num_samples samples, then the mask
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)

``prepare_selection`` also takes precomputed ``scores=`` (from ``fisher_diagonal``) or ``mask=`` (name ->
flat indices). Training before it raises. ``criterion="random"`` draws the paper's random-mask baseline
at injection instead (no data step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...registry import register_method
from .adapter import SelectiveAdapter
from .config import FishMaskConfig, SelectionError, _MaskConfig
from .fisher import LossFn, fisher_diagonal
from .select import choose_format, delta_dtype, global_top_k, random_scores, record, target_count, top_n


def mask_count(config: Any, total: int) -> int:
    """How many entries a mask config keeps out of ``total``."""
    if hasattr(config, "reserve_p"):
        return target_count(total, density=config.reserve_p)
    return target_count(total, density=config.density, top_k=config.top_k)


def mask_record(candidates: list[tuple[str, str, nn.Parameter]], mask: dict[str, Tensor]) -> dict[str, Any]:
    """``selected_params`` for a mask (name -> flat indices) over the candidates."""
    entries = []
    for path, pname, p in candidates:
        idx = mask.get(f"{path}.{pname}")
        if idx is not None and idx.numel():
            nnz = int(idx.numel())
            entries.append((path, pname, tuple(p.shape), nnz,
                            choose_format(p.numel(), nnz, torch.empty((), dtype=delta_dtype(p)).element_size())))
    return record(entries)


class MaskSelectionAdapter(SelectiveAdapter):
    """A fixed mask chosen by Fisher scores (after ``prepare_selection``) or at random (at injection)."""

    @classmethod
    def uses_mask(cls, config: Any) -> bool:
        return True

    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: _MaskConfig) -> None:
        if not cls.uses_mask(config) or config.criterion != "random":
            return  # the Fisher mask waits for prepare_selection
        candidates = cls.eligible(model, named, config)
        scores = {f"{path}.{p}": random_scores(f"{path}.{p}", tuple(t.shape), config.seed) for path, p, t in candidates}
        k = mask_count(config, sum(t.numel() for _, _, t in candidates))
        config.selected_params = mask_record(candidates, global_top_k(scores, k))

    def initial_indices(self, base: nn.Module, pname: str, nnz: int, config: Any) -> Tensor:
        if config.criterion != "random":
            return super().initial_indices(base, pname, nnz, config)
        # the same draw as ``select``: this parameter's top-nnz scores are its share of the global top-k
        key = f"{self.key}.{pname}"
        return top_n(random_scores(key, self.shapes[pname], config.seed), nnz)

    @classmethod
    def prepare_selection(
        cls,
        model: Any,
        adapter_name: str,
        dataloader: Any = None,
        loss_fn: LossFn | None = None,
        *,
        scores: dict[str, Tensor] | None = None,
        mask: dict[str, Tensor] | None = None,
        num_samples: int | None = None,
    ) -> None:
        """Choose the mask of adapter ``adapter_name`` of PeftModel ``model`` and build its trainable tensors.

        From (in order of precedence) ``mask`` (parameter name -> flat indices), ``scores`` (parameter name
        -> Fisher scores, e.g. from ``fisher_diagonal``), or the Fisher diagonal over ``num_samples``
        (default: the config's) samples of ``dataloader``. Parameter names are module path + parameter
        name in the base model (``bert.encoder.layer.0.attention.self.query.weight``).
        """
        tuner = model.base_model
        config = tuner.peft_config[adapter_name]
        if not cls.uses_mask(config):
            return
        if config.selected_params is not None and mask is None and scores is None:
            return  # chosen already (random criterion, a loaded adapter, or an earlier call)
        candidates = cls.eligible(tuner.model, tuner.candidates(), config)
        named = {f"{path}.{p}": t for path, p, t in candidates}
        if mask is None:
            if scores is None:
                if dataloader is None:
                    raise SelectionError(
                        f"{config.peft_type}: prepare_selection needs a dataloader (or scores= / mask=) to "
                        "estimate the Fisher information"
                    )
                with model.disable_adapter():
                    scores = fisher_diagonal(model, dataloader, loss_fn, num_samples or config.num_samples, named)
            missing = sorted(set(named) - set(scores))
            if missing:
                raise SelectionError(f"scores lack {len(missing)} targeted parameter(s), e.g. {missing[0]!r}")
            k = mask_count(config, sum(t.numel() for t in named.values()))
            mask = global_top_k({n: scores[n] for n in named}, k)
        unknown = sorted(set(mask) - set(named))
        if unknown:
            raise SelectionError(f"mask names {unknown[0]!r}, which is not a targeted parameter")
        for name, idx in mask.items():
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= named[name].numel()):
                raise SelectionError(f"mask indices of {name!r} fall outside its {named[name].numel()} entries")
        mask = {n: idx.reshape(-1).long().unique() for n, idx in mask.items()}
        apply_mask(model, adapter_name, mask_record(candidates, mask), mask)


def apply_mask(model: Any, adapter_name: str, selected: dict[str, Any], mask: dict[str, Tensor]) -> None:
    """Rebuild adapter ``adapter_name`` on the modules of ``selected`` and install the mask's indices.

    The adapter is removed and injected again (the task head's trainable copy is rebuilt from the original),
    so this runs before training; the active adapters stay as they were.
    """
    tuner = model.base_model
    config = tuner.peft_config[adapter_name]
    active = list(tuner.active_adapters)
    previous = config.selected_params
    config.selected_params = selected
    tuner.delete(adapter_name)
    try:
        tuner.inject(config, adapter_name, init=False)
    except BaseException:
        config.selected_params = previous  # put the adapter back as it was, then report
        tuner.inject(config, adapter_name, init=previous is None)
        tuner.set_adapter(active)
        raise
    for path, adapter in tuner.adapters(adapter_name):
        for pname in adapter.formats:
            idx = mask.get(f"{path}.{pname}")
            if idx is not None and adapter.formats[pname] in ("sparse", "masked"):
                adapter.set_indices(pname, idx)
    tuner.set_adapter([n for n in active if n in tuner.peft_config] or [adapter_name])


@register_method(
    "fish_mask",
    config=FishMaskConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="round(density N) entries of the N targeted ones (global Fisher top-k)",
    position="the entries with the largest Fisher information",
    paper="arXiv 2111.09839 (FISH mask)",
    examples={"fish_mask_random": {"density": 0.1, "criterion": "random"}},
)
class FishMaskAdapter(MaskSelectionAdapter):
    method = "fish_mask"
