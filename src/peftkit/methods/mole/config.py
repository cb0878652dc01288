"""MoleConfig: the mixture of LoRA experts' configuration, validated when built, and its builder from LoRA folders."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from ...config import ConfigError, PeftConfig, check_bool, check_int, check_number, check_probability, is_number
from ..lora.config import LoraConfig


@dataclasses.dataclass
class MoleConfig(PeftConfig):
    """MoLE (Wu, Huang & Wei 2024, arXiv 2404.13628): a learned layer-wise gate over several LoRA experts.

    Args:
        target_modules: the modules that carry the experts (names, dotted suffixes, a full-match regex or
            ``"all-linear"``; None: the query and value projections, LoRA's defaults). Filled from the experts'
            configs when ``adapters`` is given and this is None.
        exclude_modules: modules never adapted.
        adapters: expert name -> folder of a saved LoRA adapter (peft's or peftkit's ``save_pretrained``). The
            experts' tensors are read from there when the adapter is created; a saved MoLE adapter holds them in
            its own file, so loading it reads no folder. None: the experts start fresh (LoRA's initialisation).
        num_experts: N, the number of experts per layer (None: ``len(adapters)``, or 2 without folders).
        r: each expert's rank, one int for all or one per expert.
        lora_alpha: each expert's alpha (scale ``s_i = alpha_i / r_i``), one number or one per expert.
        use_rslora: ``s_i = alpha_i / sqrt(r_i)`` instead, one bool or one per expert.
        lora_dropout: dropout on the experts' input (one mask shared by the experts).
        init_lora_weights: fresh experts start as LoRA does (A Kaiming-uniform, B = 0: the model starts at the
            base); False draws B like A (a random start).
        temperature: tau of the gate's softmax ``softmax(eps / tau)``.
        gate_input: True (the paper's gate): the logits are a linear function of the layer's input,
            ``eps = W_g x + b_g``, one (N, d_in) gate per layer; False: input-independent learned logits, one (N,)
            vector per layer (mergeable).
        fixed_weights: fixed expert weights (N numbers, used as given): no gate trains and the mixture merges.
        train_experts: the experts train too (default: only the gate, as in the paper).
        balance_loss_weight: alpha in ``L = L_task + alpha L_balance``, the gating-balance loss added to the
            model's loss in training (0 turns it off).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "MOLE"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    adapters: dict[str, str] | None = None
    num_experts: int | None = None
    r: int | list[int] = 8
    lora_alpha: float | list[float] = 8
    use_rslora: bool | list[bool] = False
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    temperature: float = 1.0
    gate_input: bool = True
    fixed_weights: list[float] | None = None
    train_experts: bool = False
    balance_loss_weight: float = 0.1
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapters is not None:
            if not isinstance(self.adapters, dict) or not self.adapters or not all(
                    isinstance(k, str) and isinstance(v, (str, os.PathLike)) for k, v in self.adapters.items()):
                raise ConfigError(f"MoleConfig.adapters: expected None or a non-empty dict expert name -> LoRA adapter "
                                  f"folder, got {self.adapters!r}")
            self.adapters = {k: os.fspath(v) for k, v in self.adapters.items()}
        if self.num_experts is None:
            self.num_experts = len(self.adapters) if self.adapters else 2
        check_int(self, "num_experts", 1)
        if self.adapters and len(self.adapters) != self.num_experts:
            self._check(False, "num_experts", f"len(adapters) = {len(self.adapters)} (one expert per folder)")
        n = self.num_experts
        self._per_expert("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int")
        self._per_expert("lora_alpha", lambda v: is_number(v) and v > 0, "a positive number")
        self._per_expert("use_rslora", lambda v: isinstance(v, bool), "True or False")
        check_probability(self, "lora_dropout")
        check_number(self, "temperature", above=0)
        check_number(self, "balance_loss_weight", minimum=0)
        check_bool(self, "init_lora_weights", "gate_input", "train_experts")
        if self.fixed_weights is not None:
            self._check(isinstance(self.fixed_weights, (list, tuple)) and len(self.fixed_weights) == n
                        and all(is_number(w) for w in self.fixed_weights), "fixed_weights",
                        f"None or a list of num_experts = {n} numbers")
            self.fixed_weights = [float(w) for w in self.fixed_weights]

    def _per_expert(self, field: str, ok: Any, what: str) -> None:
        value = getattr(self, field)
        if isinstance(value, (list, tuple)):
            self._check(len(value) == self.num_experts and all(ok(v) for v in value), field,
                        f"{what}, or a list of num_experts = {self.num_experts} of them")
            setattr(self, field, list(value))
        else:
            self._check(ok(value), field, f"{what}, or a list of num_experts = {self.num_experts} of them")

    # -- the experts' shapes -------------------------------------------------------------------------------
    def expert_value(self, field: str, i: int) -> Any:
        value = getattr(self, field)
        return value[i] if isinstance(value, list) else value

    def expert_scale(self, i: int) -> float:
        """``s_i = alpha_i / r_i`` (rsLoRA: ``alpha_i / sqrt(r_i)``), as LoRA computes it."""
        r, alpha = self.expert_value("r", i), self.expert_value("lora_alpha", i)
        return alpha / r ** 0.5 if self.expert_value("use_rslora", i) else alpha / r

    @classmethod
    def from_lora_folders(cls, adapters: dict[str, str], **kwargs: Any) -> "MoleConfig":
        """A config whose experts are the LoRA adapters in ``adapters`` (name -> folder): ranks, alphas, rsLoRA and
        targets read from their ``adapter_config.json``; ``kwargs`` set the other fields (gate, temperature ...)."""
        specs = lora_specs(adapters)
        return cls(adapters=dict(adapters), **specs, **kwargs)


def lora_specs(adapters: dict[str, str]) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``use_rslora``, ``target_modules`` of the LoRA experts in ``adapters`` (read from their
    configs, not their tensors); every expert must be a plain LoRA on the same targets."""
    r, alpha, rslora, targets = [], [], [], None
    for name, folder in adapters.items():
        where = f"MoleConfig.adapters[{name!r}] ({folder})"
        try:
            config = PeftConfig.from_pretrained(os.fspath(folder))
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: not a readable LoRA adapter folder ({err})") from None
        if not isinstance(config, LoraConfig):
            raise ValueError(f"{where}: the adapter there is peft_type {config.peft_type!r}; MoLE experts must be "
                             "LoRA adapters (peft_type 'LORA')")
        for field in ("rank_pattern", "alpha_pattern"):
            if getattr(config, field):
                raise ValueError(f"{where}: LoraConfig.{field}={getattr(config, field)!r}; a MoLE expert has one "
                                 f"rank and alpha on every module ({field}={{}})")
        mine = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules or [])
        if targets is not None and mine != targets:
            raise ValueError(f"{where}: target_modules={mine!r}, the first expert's are {targets!r}; MoLE's experts "
                             "adapt the same modules (one gate per layer over all of them)")
        targets = mine
        r.append(config.r)
        alpha.append(config.lora_alpha)
        rslora.append(bool(config.use_rslora))
    return {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": targets}
