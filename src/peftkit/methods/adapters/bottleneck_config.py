"""The bottleneck adapter's configuration (Houlsby / Pfeiffer / parallel adapter; see ``bottleneck``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import ConfigError, PeftConfig, check_int, check_probability

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
               "identity": lambda t: t}
ROLES = ("attention_output", "ffn_output", "ffn")


@dataclasses.dataclass
class BottleneckConfig(PeftConfig):
    """A bottleneck adapter (Houlsby / Pfeiffer / parallel adapter; the three registered names differ only
    in their defaults).

    Args:
        positions: roles the adapter attaches to ("attention_output", "ffn_output", "ffn"), resolved through
            the architecture's role table. Ignored when ``target_modules`` is set.
        target_modules: explicit module names / dotted suffixes / a full-match regex (any module with a
            Linear inside; in sequence the target must be a Linear / GPT-2 Conv1D).
        exclude_modules, layers_to_transform, layers_pattern: as for every method.
        mode: "sequential" (``h + s A(h)`` on the target's output h) or "parallel" (``out + s A(x)``, x the
            target's input).
        bottleneck_size: m. When None, ``d / reduction_factor`` (rounded down, at least 1).
        reduction_factor: d / m, used when ``bottleneck_size`` is None.
        non_linearity: f: "relu", "gelu", "swish" (= "silu"), "tanh" or "identity".
        scaling: s, the factor on the adapter's output (4 for He et al.'s scaled parallel adapter).
        residual: in sequence, add the adapter's input back (``h + s A(h)``); False gives ``s A(h)``.
        init_weights: "bert": every weight N(0, 0.01^2), biases 0 (near identity, Houlsby); "lora": down
            Kaiming-uniform, up and biases 0 (exactly the base at init, He et al.).
        dropout: dropout on the adapter's input.
        train_layernorms: also train every LayerNorm of the model (Houlsby), through ``modules_to_save``.
        original_ln_before: in sequence on a post-LN model, read the sublayer's output after its residual and
            LayerNorm and add back before that LayerNorm: ``LN(h + r + s A(LN(h + r)))`` (AdapterHub's
            ``original_ln_before=True`` with ``residual_before_ln=True``, its Pfeiffer/SeqBn default). Wraps the
            LayerNorm beside each targeted output Linear; models without one (pre-LN: Llama, GPT-2, T5, ViT)
            raise NotApplicableError.
        split_ffn: (output module, input module) names of an FFN split over two siblings; filled from the
            role table when ``positions`` has "ffn" on BERT-like models, settable for other models.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["attention_output", "ffn_output"])
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    mode: str = "sequential"
    bottleneck_size: int | None = 64
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    residual: bool = True
    init_weights: str = "bert"
    dropout: float = 0.0
    train_layernorms: bool = False
    original_ln_before: bool = False
    split_ffn: list[str] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.positions, str):
            self.positions = [self.positions]
        bad = [p for p in self.positions if p not in ROLES]
        if bad:
            raise ConfigError(f"{type(self).__name__}.positions: unknown role(s) {bad}; expected some of {ROLES}")
        self._check(self.mode in ("sequential", "parallel"), "mode", '"sequential" or "parallel"')
        check_int(self, "bottleneck_size", 1, optional=True, expected="a positive int or None")
        self._check(self.bottleneck_size is not None or (self.reduction_factor or 0) > 0, "reduction_factor",
                    "a positive number when bottleneck_size is None")
        self._check(self.non_linearity in ACTIVATIONS, "non_linearity", f"one of {sorted(ACTIVATIONS)}")
        self._check(self.init_weights in ("bert", "lora"), "init_weights", '"bert" or "lora"')
        check_probability(self, "dropout")
        self._check(self.split_ffn is None or len(self.split_ffn) == 2, "split_ffn",
                    "None or [output module, input module]")
        if self.original_ln_before:
            self._check(self.mode == "sequential" and self.residual, "original_ln_before",
                        'False unless mode="sequential" and residual=True')
            self._check(not self.train_layernorms, "original_ln_before",
                        "False with train_layernorms=True (the LayerNorm hosts the adapter)")

    def size(self, d: int) -> int:
        """The bottleneck m for a target of width d."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(d // self.reduction_factor))


# -- the registered variants: the same adapter, other defaults (registered in ``bottleneck``) -------------------
@dataclasses.dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby adapter: after the attention output and the FFN output, ``h + W_up f(W_down h)``, m = 64.

    Args: as :class:`BottleneckConfig`.
    """

    PEFT_TYPE: ClassVar[str] = "HOULSBY"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["attention_output", "ffn_output"])
    bottleneck_size: int | None = 64
    init_weights: str = "bert"


@dataclasses.dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer adapter: after the FFN output only, reduction factor 16, ReLU.

    Args: as :class:`BottleneckConfig`.
    """

    PEFT_TYPE: ClassVar[str] = "PFEIFFER"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["ffn_output"])
    bottleneck_size: int | None = None
    reduction_factor: float | None = 16.0
    init_weights: str = "bert"


@dataclasses.dataclass
class ParallelAdapterConfig(BottleneckConfig):
    """Scaled parallel adapter beside the FFN: ``FFN(x) + s W_up ReLU(W_down x)``, s = 4, m = 512, up zero-init.

    Args: as :class:`BottleneckConfig`.
    """

    PEFT_TYPE: ClassVar[str] = "PARALLEL_ADAPTER"

    positions: list[str] = dataclasses.field(default_factory=lambda: ["ffn"])
    mode: str = "parallel"
    bottleneck_size: int | None = 512
    scaling: float = 4.0
    init_weights: str = "lora"
