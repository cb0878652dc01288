"""BitFit (Ben Zaken, Ravfogel, Goldberg 2022, arXiv 2106.10199): fine-tune only the bias terms.

``b = b0 + delta_b`` for every selected bias; weights stay frozen. Training all biases of RoBERTa-base is
about 0.1M parameters (0.08%); the paper's smaller variant trains only the query and the FFN-intermediate
biases (``target_modules=["query", "intermediate.dense"]`` on BERT / RoBERTa).

The delta is added to the layer output (``F.linear(x, W0, b0 + delta_b)``), so the frozen weight is used
as it is: no copy, no extra pass.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...registry import register_method
from ...targeting import NotApplicableError
from .adapter import SelectiveAdapter
from .config import BitFitConfig
from .select import eligible, record


@register_method(
    "bitfit",
    config=BitFitConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="sum of the selected bias sizes",
    position="bias terms",
    paper="arXiv 2106.10199 (BitFit)",
    examples={"bitfit": {}},
)
class BitFitAdapter(SelectiveAdapter):
    method = "bitfit"

    @classmethod
    def eligible(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any):
        return eligible(model, named, config, only=("bias",))

    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: BitFitConfig) -> None:
        found = cls.eligible(model, named, config)
        if not found:
            where = "" if config.target_modules is None else f" among target_modules={config.target_modules!r}"
            raise NotApplicableError(f"BitFit: {type(model).__name__} has no bias to train{where}")
        config.selected_params = record([(path, p, tuple(t.shape), t.numel(), "full") for path, p, t in found])
