"""AdapterDropConfig: a bottleneck adapter's configuration plus which of the lowest layers go without it."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import check_bool, check_int
from ..adapters.bottleneck_config import BottleneckConfig


@dataclasses.dataclass
class AdapterDropConfig(BottleneckConfig):
    """AdapterDrop (Rücklé et al. 2021, arXiv 2010.11918): bottleneck adapters without the lowest n layers'.

    Every field of :class:`peftkit.BottleneckConfig`, with Pfeiffer's defaults (one adapter after each FFN output,
    reduction factor 16); ``positions=["attention_output", "ffn_output"], bottleneck_size=64`` gives Houlsby's.

    Args:
        drop_layers: n, the number of lowest transformer layers (layer index < n) whose adapters are dropped at
            inference; without ``stochastic`` also in training, and those layers get no adapter at all (the
            paper's specialised AdapterDrop). May be changed on a loaded model (``peft_config[name].drop_layers``)
            to drop more, or, after robust training, fewer.
        stochastic: robust AdapterDrop: every layer gets an adapter, and each training forward drops the lowest
            n layers' with n drawn uniformly from {0, ..., max_drop_layers}; inference drops ``drop_layers``.
        max_drop_layers: the largest n a robust training forward draws (None: the number of adapted layers - 1,
            the paper's {0, ..., 11} on 12 layers).
    """

    PEFT_TYPE: ClassVar[str] = "ADAPTERDROP"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["ffn_output"])
    bottleneck_size: int | None = None
    reduction_factor: float | None = 16.0
    drop_layers: int = 5
    stochastic: bool = False
    max_drop_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "drop_layers", 0)
        check_bool(self, "stochastic")
        check_int(self, "max_drop_layers", 0, optional=True, expected="None or an int >= 0")
