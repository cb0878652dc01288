"""MAD-X's language adapter configuration: AdapterHub's ``PfeifferInvConfig`` (``SeqBnInvConfig``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..adapters.bottleneck_config import PfeifferConfig


@dataclasses.dataclass
class PfeifferInvConfig(PfeifferConfig):
    """A Pfeiffer bottleneck adapter with an invertible adapter on the input embeddings (MAD-X's language adapter).

    Args:
        inv_adapter: the invertible block; "nice" (NICE additive coupling, AdapterHub's default and only
            block peftkit has).
        inv_adapter_reduction_factor: r: each coupling MLP's hidden width is its input width (a half of d) over r, rounded down.
        inv_adapter_modules: [input module, output module or None]: where the coupling and its inverse sit.
            Filled at injection: the input embeddings (on BERT-like models the embedding block's LayerNorm, so
            the coupling reads the summed, normalised embeddings as AdapterHub's hook after ``BertEmbeddings``
            does) and the output embeddings (the LM head's vocabulary projection, None without one).
        Others: as :class:`~peftkit.PfeifferConfig`.
    """

    PEFT_TYPE: ClassVar[str] = "PFEIFFER_INV"

    inv_adapter: str = "nice"
    inv_adapter_reduction_factor: float = 2.0
    inv_adapter_modules: list[str | None] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.inv_adapter == "nice", "inv_adapter", '"nice"')
        self._check(isinstance(self.inv_adapter_reduction_factor, (int, float))
                    and not isinstance(self.inv_adapter_reduction_factor, bool)
                    and self.inv_adapter_reduction_factor > 0, "inv_adapter_reduction_factor", "a positive number")
        self._check(self.inv_adapter_modules is None or len(self.inv_adapter_modules) == 2, "inv_adapter_modules",
                    "None or [input module, output module or None]")

    def inv_width(self, half: int) -> int:
        """The hidden width of a coupling MLP reading ``half`` features."""
        return int(half // self.inv_adapter_reduction_factor)
