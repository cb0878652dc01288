"""MoLE, mixture of LoRA experts (Wu, Huang & Wei 2024, arXiv 2404.13628): a learned gate per layer over LoRAs.

N LoRAs, trained apart (loaded from their adapter folders, ``MoleConfig.adapters``) or fresh, each layer of each
LoRA an expert ``E_i(x) = s_i B_i A_i x``. Every adapted layer has its own gate (the paper's layer-wise gating)

    eps = W_g x + b_g                      (N logits, a linear function of the layer's input)
    g(x) = softmax(eps / tau)              (tau: ``temperature``)
    h = W0 x + sum_i g_i(x) s_i B_i A_i x

and only the gates train (``W_g (N, d_in)``, ``b_g (N,)`` per layer; zero at the start: every expert weighted
1/N); the experts stay frozen unless ``train_experts``. The gating-balance loss keeps the gate from settling
on one expert:

    q_i = (1/M) sum_k g_i^(k)              (expert i's gate value averaged over the M gated layers)
    L_balance = -log prod_i q_i,           L = L_task + alpha L_balance   (alpha: ``balance_loss_weight``)

added to the model's loss in training (``extra_loss``). Each layer's gate values are averaged over the tokens of
the batch; the average of the last training forward is kept on the layer for the loss (a training step is one
call at a time).

Without ``gate_input`` the gate is input-independent learned logits ``(N,)`` per layer, ``g = softmax(l / tau)``;
with ``fixed_weights`` it is N fixed numbers (no gate trains). Both merge: ``W = W0 + sum_i g_i s_i B_i A_i``
through the engine's wrapper (unmerge restores W0 bit for bit). The input-dependent gate refuses a merge.

File keys (peftkit's layout; peft has no MoLE): ``<path>.mole_experts.<i>.lora_A.weight`` /
``.lora_B.weight`` for expert i (the experts travel with the adapter, so loading reads no folder),
``<path>.mole_gate.weight`` / ``.bias`` (input-dependent gate) or ``<path>.mole_gate.logits``.

Where peftkit differs from the paper: the paper's gate reads the experts' outputs, normalised, concatenated and
flattened over the whole sequence (``eps = Flatten(E_Omega(x))^T e``), which ties the gate to one sequence length;
here the gate is a linear function of each token's layer input (one gate value per token, any length; the
experts' outputs are themselves linear in x). The balance loss averages over the batch's tokens, padding
included (the layer sees no attention mask). One dropout mask is shared by the experts. With activation
checkpointing in reentrant mode the first forward runs without autograd, so the balance loss adds no gradient.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ...targeting import find_targets
from ..xlora.experts import expert_tensors, read_experts
from . import functional as MF
from .config import MoleConfig, lora_specs

SUPPORTED = (nn.Linear, *CONV1D_TYPES)


# an expert's file keys on a Linear / Conv1D layer (LoRA's; MoLE's experts live on those layers only)
_EXPERT_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


def _as_mole_error(err: Exception) -> ValueError:
    """X-LoRA's expert reader's message, naming MoLE's field instead of X-LoRA's."""
    return ValueError(str(err).replace("XLoraConfig.adapters", "MoleConfig.adapters").replace("X-LoRA", "MoLE"))


@register_method(
    "mole", config=MoleConfig, category="hybrid", modalities=("text", "vision", "vision-language", "generation"),
    mergeable=False,
    param_formula="N (d_in + 1) per target (the gate; N (gate_input=False), 0 (fixed_weights)); "
                  "+ N r (d_in + d_out) with train_experts",
    position="a gated mixture of LoRA experts beside each adapted layer",
    paper="arXiv 2404.13628 (MoLE)",
    # fresh experts (B = 0): the model starts at the base; tests/methods/test_mole.py loads experts from folders
    examples={"mole": {"num_experts": 3, "r": 2, "lora_alpha": 4}},
)
class MoleAdapter(Adapter):
    supported_layers = SUPPORTED
    default_roles = ("query", "value")  # LoRA's

    # -- targets and the experts' tensors ------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: MoleConfig) -> None:
        """Experts named by folder on a config without targets: ranks, alphas and targets from their configs."""
        if config.adapters and config.target_modules is None:
            for field, value in lora_specs(config.adapters).items():
                setattr(config, field, value)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: MoleConfig) -> list[str]:
        paths = find_targets(model, named, config, cls.default_roles, cls.supported_layers)
        vars(config)["_mole_named"] = (model, named)  # for reading the experts' folders (plan_parameters)
        return paths

    @classmethod
    def plan_parameters(cls, model: nn.Module, config: MoleConfig, adapter_name: str, paths: list[str],
                        init: bool) -> None:
        """A new adapter with ``adapters``: every folder read and checked against the config and the targets
        before the model changes; the tensors wait on the config for the layers being built. A load reads none
        (the experts are in the adapter's file)."""
        found = vars(config).pop("_mole_named", None)
        if not (init and config.adapters) or found is None:
            return None
        try:
            experts = read_experts(found[0], found[1], config.adapters)
        except ValueError as err:
            raise _as_mole_error(err) from None
        for e in experts:
            where = f"MoleConfig.adapters[{e.name!r}] ({e.folder})"
            for field in ("r", "lora_alpha", "use_rslora"):
                mine, theirs = config.expert_value(field, e.index), getattr(e.config, field)
                if mine != theirs:
                    raise ValueError(f"{where}: LoraConfig.{field}={theirs!r} but MoleConfig.{field} gives expert "
                                     f"{e.index} {mine!r}; build the config with MoleConfig.from_lora_folders")
            if set(e.paths) != set(paths):
                other = sorted(set(e.paths) ^ set(paths))[0]
                raise ValueError(f"{where}: the expert and MoleConfig.target_modules differ on module {other!r}; "
                                 "MoLE's experts adapt exactly the targeted modules")
        vars(config)["_mole_experts"] = experts
        return None

    # -- the layer -----------------------------------------------------------------------------------------
    def __init__(self, base: nn.Module, config: MoleConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, SUPPORTED):
            raise TypeError(f"{key}: MoLE wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        self.__dict__["config"] = config
        self.key = key
        n = config.num_experts
        d_out, d_in = layer_dims(base)
        self.transposed = is_transposed(base)
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base)}
        self.scales = [config.expert_scale(i) for i in range(n)]
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        keys = {}
        for i in range(n):
            r = config.expert_value("r", i)
            self.register_parameter(f"lora_A_{i}", nn.Parameter(torch.empty(r, d_in, **factory)))  # (r_i, d_in)
            self.register_parameter(f"lora_B_{i}", nn.Parameter(torch.empty(d_out, r, **factory)))  # (d_out, r_i)
            keys[f"lora_A_{i}"] = f"mole_experts.{i}.lora_A.weight"
            keys[f"lora_B_{i}"] = f"mole_experts.{i}.lora_B.weight"
        self.gate_weight = self.gate_bias = self.gate_logits = None
        if config.fixed_weights is None and config.gate_input:
            self.gate_weight = nn.Parameter(torch.zeros(n, d_in, **factory))  # (N, d_in)
            self.gate_bias = nn.Parameter(torch.zeros(n, **factory))  # (N,)
            keys.update(gate_weight="mole_gate.weight", gate_bias="mole_gate.bias")
        elif config.fixed_weights is None:
            self.gate_logits = nn.Parameter(torch.zeros(n, **factory))  # (N,)
            keys["gate_logits"] = "mole_gate.logits"
        self.checkpoint_keys = keys
        self.__dict__["last_gate_mean"] = None
        if init:
            self._init_experts(config, key)

    def _init_experts(self, config: MoleConfig, key: str) -> None:
        experts = vars(config).get("_mole_experts")
        for i, (A, B) in enumerate(zip(self.As, self.Bs)):
            if experts is None:
                MF.init_expert(A, B, config.init_lora_weights)
                continue
            shaped = types.SimpleNamespace(lora_A=A, lora_B=B, checkpoint_keys=_EXPERT_KEYS)
            try:
                tensors = expert_tensors(experts[i], key, shaped)
            except ValueError as err:
                raise _as_mole_error(err) from None
            with torch.no_grad():
                A.copy_(tensors["lora_A"])
                B.copy_(tensors["lora_B"])

    @property
    def As(self) -> list[Tensor]:
        return [getattr(self, f"lora_A_{i}") for i in range(len(self.scales))]

    @property
    def Bs(self) -> list[Tensor]:
        return [getattr(self, f"lora_B_{i}") for i in range(len(self.scales))]

    def requires_grad_(self, requires_grad: bool = True) -> "MoleAdapter":
        """The gate trains; the experts only with ``train_experts``."""
        for name, p in self._parameters.items():
            if p is not None:
                p.requires_grad_(requires_grad and (name.startswith("gate_") or self.config.train_experts))
        return self

    @classmethod
    def param_count(cls, base: nn.Module, config: MoleConfig, key: str = "") -> int:
        """The gate's ``N (d_in + 1)`` (``N`` logits without ``gate_input``, none with ``fixed_weights``), plus
        ``sum_i r_i (d_in + d_out)`` when the experts train."""
        d_out, d_in = layer_dims(base)
        n = config.num_experts
        count = 0 if config.fixed_weights is not None else n * (d_in + 1) if config.gate_input else n
        if config.train_experts:
            count += sum(config.expert_value("r", i) * (d_in + d_out) for i in range(n))
        return count

    # -- forward -------------------------------------------------------------------------------------------
    def weights(self, x: Tensor | None = None) -> Tensor:
        """The experts' weights: ``g(x)`` (..., N) for the input-dependent gate, else one (N,) vector."""
        config = self.config
        if config.fixed_weights is not None:
            A = self.lora_A_0
            return torch.tensor(config.fixed_weights, dtype=A.dtype, device=A.device)
        return MF.gate(x, self.gate_weight, self.gate_bias, self.gate_logits, config.temperature)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        xa = x.to(self.lora_A_0.dtype)
        g = self.weights(xa)
        if self.training and self.config.fixed_weights is None:
            self.__dict__["last_gate_mean"] = g.reshape(-1, g.shape[-1]).mean(0)  # for the balance loss
        if self.dropout is not None:
            xa = self.dropout(xa)
        return out + MF.mixture(xa, self.As, self.Bs, self.scales, g).to(out.dtype)

    # -- merge: an input-independent gate only --------------------------------------------------------------
    def check_merge(self, base: nn.Module) -> None:
        if self.gate_weight is not None:
            raise ValueError(f"MoLE: {self.key or 'this layer'}'s gate depends on the input (MoleConfig.gate_input="
                             "True): no merged weight stands for it; merge with gate_input=False or fixed_weights")

    def delta_weight(self, base: nn.Module) -> Tensor:
        self.check_merge(base)
        with torch.no_grad():
            return MF.delta_weight(self.As, self.Bs, self.scales, self.weights().detach(), self.transposed)

    # -- the gating-balance loss ----------------------------------------------------------------------------
    @classmethod
    def extra_loss(cls, tuner: Any, adapter_name: str) -> Tensor | None:
        """``balance_loss_weight * L_balance`` over the layers' gate values of the last training forward."""
        config = tuner.peft_config[adapter_name]
        means = []
        for _, adapter in tuner.adapters(adapter_name):
            if isinstance(adapter, MoleAdapter) and adapter.last_gate_mean is not None:
                means.append(adapter.last_gate_mean)
                adapter.__dict__["last_gate_mean"] = None
        if not means or config.balance_loss_weight == 0:
            return None
        return config.balance_loss_weight * MF.balance_loss(means)


__all__ = ["MoleAdapter", "SUPPORTED"]
