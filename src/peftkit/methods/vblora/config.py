"""VBLoRAConfig: field names and defaults as in Hugging Face PEFT (``peft.VBLoRAConfig``), validated when built."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability


@dataclasses.dataclass
class VBLoRAConfig(PeftConfig):
    """VB-LoRA configuration (PEFT's fields and defaults).

    Args:
        r: rank of the low-rank factors ``A`` (r x d_in) and ``B`` (d_out x r).
        num_vectors: number of vectors in the shared vector bank.
        vector_length: length ``b`` of each bank vector; it must divide every target's input and output width.
        topk: how many bank vectors each sub-vector mixes (K in the paper; 2 works best).
        target_modules: names (exact or dotted suffix), a full-match regex or ``"all-linear"``; None picks the
            architecture's default (PEFT's VB-LoRA table).
        exclude_modules: names or regex never to target.
        save_only_topk_weights: save each sub-vector's top-k indices and its first k-1 softmax weights instead of
            the full logits (a smaller file for merging or inference; training cannot resume from it).
        vblora_dropout: dropout on the layer input of the adapter branch.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).
        bias: which base biases train and are saved with the adapter: "none", "all" or "vblora_only".
        modules_to_save: modules trained in full and saved with the adapter.
        init_vector_bank_bound: the bank starts uniform in [-bound, bound].
        init_logits_std: the logits start normal with this standard deviation.
        layers_to_transform / layers_pattern: keep only these layer indices.
    """

    PEFT_TYPE: ClassVar[str] = "VBLORA"

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", 1)
        check_int(self, "num_vectors", 1)
        check_int(self, "vector_length", 1)
        check_int(self, "topk", 1)
        self._check(self.topk <= self.num_vectors, "topk", f"an integer in [1, num_vectors={self.num_vectors}]")
        check_bool(self, "save_only_topk_weights", "fan_in_fan_out")
        check_probability(self, "vblora_dropout")
        check_number(self, "init_vector_bank_bound", minimum=0)
        check_number(self, "init_logits_std", minimum=0)
        self._check(self.bias in ("none", "all", "vblora_only"), "bias", "'none', 'all' or 'vblora_only'")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple, frozenset)):
                setattr(self, name, sorted(getattr(self, name)))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("VBLoRAConfig.layers_pattern: only meaningful together with layers_to_transform")
