"""Arrow routing over a library of LoRA experts (Ostapenko et al. 2024, arXiv 2405.11157), with General Knowledge
Subtraction (GenKnowSub; Bagherifard et al., ACL 2025): ``create_arrow_model`` and ``LoraConfig(arrow_config=...)``.

Given E task-specific LoRA experts ``(A_e, B_e, s_e)`` on a Linear layer, data-free and computed once per layer:

- prototype ``p_e`` = the top right singular vector of ``B_e A_e`` (d_in,), by 15 power iterations on
  ``v -> A_e^T (B_e^T B_e) (A_e v)`` in float32 (``arrow_math.top_right_singular_vector``);
- with GenKnowSub (``use_gks``), first ``A_e -= mean_g A_g`` and ``B_e -= mean_g B_g`` over the general adapters
  (task arithmetic's forgetting by negation, on the factors as peft does it; the experts' tensors change in place).

Then each token x is routed: ``score_e = |x . p_e|``, ``w = softmax(topk_k(score) / T)`` (0 off the top k) and
``h = W0 x + dropout(sum_e w_e s_e B_e A_e x)`` (``arrow_math.arrow_delta``).

As peft 0.21.2 (``create_arrow_model``, ``ArrowLoraLinearLayer``): the experts are loaded as LoRA adapters
``task_0 ... task_{E-1}`` (and ``gks_0 ...``), then a router adapter ``arrow_router`` (a LoRA adapter with
``arrow_config``, rank r of the experts, on the experts' target module names) is added and made the only active
adapter; its own ``lora_A`` / ``lora_B`` (LoRA's init, trainable, unused by the forward) are saved under peft's keys,
so ``save_pretrained`` writes peft's folders. GenKnowSub and the prototypes run at the first forward of each layer
(peft's timing, so the global generator's draws with ``rng_seed=None`` are peft's, and a save before any forward
writes the experts unsubtracted); an expert added to the layer later is subtracted (GenKnowSub done) and every
prototype is rebuilt at the next forward. Merging is refused (the weights depend on the token).

Where peftkit differs from peft 0.21.2:
- the experts of a layer are its LoRA adapters other than routers and ``gks_<i>`` (peft excludes a router only when
  it is named "arrow_router", and crashes when an expert is deleted or misses a layer); a layer the router targets
  but no expert adapts is left unchanged (peft fails there);
- bad inputs fail in ``create_arrow_model``, before the model changes or with the changes undone: ``top_k`` above
  the number of experts (peft: a torch error at the first forward), missing folders, experts of other ranks or
  targets (checked per layer; peft compares the last layer's rank and the target names);
- a saved router loads (peft drops ``task_adapter_names`` when it reads the file and cannot build it);
- the routed update is cast to the layer output's dtype (peft returns the adapter dtype, float32 on a half base).
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import CONV1D_TYPES
from ...layers import adapter_layers
from ...model import PeftModel
from . import arrow_math as AM
from . import dispatch
from .arrow_config import FIELD, ArrowConfig, arrow_subconfig
from .config import LoraConfig
from .layer import LoraAdapter

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"
ROUTER_NAME = "arrow_router"
_GKS_NAME = re.compile(r"gks_\d+")
_MERGE_REFUSED = "Cannot merge an active Arrow router adapter. Remove it first."
_PREPARE = threading.Lock()  # the one-time preparation of a layer (GenKnowSub, prototypes) under concurrent calls


def _is_expert(name: str, adapter: nn.Module) -> bool:
    return isinstance(adapter, LoraAdapter) and not isinstance(adapter, ArrowAdapter) and not _GKS_NAME.fullmatch(name)


class ArrowAdapter(LoraAdapter):
    """The router on one Linear layer: routes each token over the layer's LoRA experts (see the module doc)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        if not isinstance(base, (nn.Linear, *CONV1D_TYPES)):
            raise ValueError(f"LoraConfig.arrow_config: the Arrow router adapts Linear layers (nn.Linear, GPT-2's "
                             f"Conv1D) only, as peft; {key or 'a target'} is a {type(base).__name__}: leave it out "
                             "of target_modules")
        super().__init__(base, config, key, init=init)
        arrow: ArrowConfig = config.arrow_config
        self.top_k, self.temperature, self.rng_seed = arrow.top_k, arrow.router_temperature, arrow.rng_seed
        self.use_gks = arrow.use_gks
        self.task_names = list(arrow.task_adapter_names or [])  # create_arrow_model's order comes first
        self.gks_names = None if arrow.gks_adapter_names is None else list(arrow.gks_adapter_names)
        self.register_buffer("prototypes", None, persistent=False)  # (E, d_in), in the experts' dtype
        self.expert_names: tuple[str, ...] | None = None  # the experts the prototypes were built for
        self.gks_done = False
        self.gks_pending: list[str] = []  # experts added after GenKnowSub ran, subtracted at the next forward
        self.__dict__["siblings"] = None  # the layer's adapters (set by ``link``; not a submodule)

    # -- the layer's experts ---------------------------------------------------------------------------------
    def experts(self) -> list[tuple[str, LoraAdapter]]:
        """The layer's LoRA experts: create_arrow_model's order, then any added since, in the layer's order."""
        siblings = self.__dict__["siblings"]
        if siblings is None:
            raise RuntimeError(f"{self.key}: this Arrow router is not attached to a model's layer")
        found = {n: a for n, a in siblings.items() if _is_expert(n, a)}
        order = [n for n in self.task_names if n in found] + [n for n in found if n not in self.task_names]
        return [(n, found[n]) for n in order]

    def general(self) -> list[LoraAdapter]:
        siblings = self.__dict__["siblings"]
        names = self.gks_names if self.gks_names is not None else [n for n in siblings if _GKS_NAME.fullmatch(n)]
        missing = [n for n in names if n not in siblings]
        if missing or not names:
            raise ValueError(f"ArrowConfig.use_gks: GenKnowSub needs the general adapters on {self.key}; missing "
                             f"{missing or 'all (no gks_<i> adapter)'} (create_arrow_model's general_adapter_paths)")
        return [siblings[n] for n in names]

    @torch.no_grad()
    def prepare(self, experts: list[tuple[str, LoraAdapter]]) -> None:
        """GenKnowSub and the prototypes, once per set of experts (peft's ``gen_know_sub`` / ``build_prototypes``,
        with ``on_adapter_change`` for experts added later)."""
        names = tuple(n for n, _ in experts)
        if names != self.expert_names:
            if self.expert_names is not None and len(names) > len(self.expert_names):
                self.gks_pending = [n for n in names if n not in self.expert_names]
            self.expert_names, self.prototypes = names, None
        if self.use_gks and (not self.gks_done or self.gks_pending):
            general = [(g.lora_A, g.lora_B) for g in self.general()]
            todo = set(self.gks_pending) if self.gks_done else set(names)
            AM.subtract_general_knowledge([(a.lora_A, a.lora_B) for n, a in experts if n in todo], general)
            self.gks_done, self.gks_pending = True, []
        if self.prototypes is None:
            protos = [AM.top_right_singular_vector(a.lora_A, a.lora_B, self.rng_seed).to(a.lora_A.dtype)
                      for _, a in experts]
            self.prototypes = torch.stack(protos)

    def _ready(self, experts: list[tuple[str, LoraAdapter]]) -> bool:
        return (self.prototypes is not None and self.expert_names == tuple(n for n, _ in experts)
                and not (self.use_gks and (not self.gks_done or self.gks_pending)))

    # -- what the router refuses ------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None  # LoRA's fast paths know no routing

    def check_merge(self, base: nn.Module) -> None:
        raise RuntimeError(_MERGE_REFUSED)  # peft's words: per-token routing has no single merged weight

    def delta_weight(self, base: nn.Module) -> Tensor:
        raise RuntimeError(_MERGE_REFUSED)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        experts = self.experts()
        if not experts:
            return out  # a target no expert adapts
        if len(experts) < self.top_k:
            raise ValueError(f"ArrowConfig.top_k={self.top_k}: {self.key} has only {len(experts)} LoRA experts "
                             f"({', '.join(n for n, _ in experts)}); expected top_k <= the number of experts")
        if not self._ready(experts):
            with _PREPARE, torch.inference_mode(False):
                self.prepare(self.experts())
        dtype = experts[0][1].lora_A.dtype
        x = x.to(dtype)
        delta = AM.arrow_delta(x, self.prototypes, [a.lora_A for _, a in experts], [a.lora_B for _, a in experts],
                               [a.scaling for _, a in experts], self.top_k, self.temperature)
        if self.dropout is not None:
            delta = self.dropout(delta)
        return out + delta.to(out.dtype)


# -- model-level hooks (LoraAdapter's, through dispatch) --------------------------------------------------------
def link(model: nn.Module, adapter_name: str) -> None:
    """Point a new Arrow router at its layers' adapters (the layer's ModuleDict: experts added later are seen)."""
    for _, layer in adapter_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, ArrowAdapter):
            adapter.__dict__["siblings"] = layer.adapters


def check_new_adapter(configs: dict[str, Any], config: Any, adapter_name: str) -> None:
    """A router needs its experts on the model first, at least ``top_k`` of them, and the general adapters with
    GenKnowSub."""
    arrow = getattr(config, FIELD, None)
    if arrow is None:
        return
    lora = {n: c for n, c in configs.items() if isinstance(c, LoraConfig) and getattr(c, FIELD, None) is None}
    tasks = [n for n in lora if not _GKS_NAME.fullmatch(n)]
    missing = [n for n in arrow.task_adapter_names or [] if n not in lora]
    if missing or not tasks:
        raise ValueError(f"LoraConfig.arrow_config: the Arrow router {adapter_name!r} needs its LoRA experts on the "
                         f"model first; missing {missing or 'all'}: build it with create_arrow_model(...) or load the "
                         "experts before the router")
    if arrow.top_k > len(tasks):
        raise ConfigError(f"ArrowConfig.top_k={arrow.top_k}: larger than the number of task experts on the model "
                          f"({len(tasks)}: {tasks}); expected 1 <= top_k <= {len(tasks)}")
    if arrow.use_gks:
        gks = arrow.gks_adapter_names if arrow.gks_adapter_names is not None else [
            n for n in lora if _GKS_NAME.fullmatch(n)]
        absent = [n for n in gks if n not in lora]
        if absent or not gks:
            raise ValueError(f"ArrowConfig.use_gks: GenKnowSub needs the general LoRA adapters on the model first; "
                             f"missing {absent or 'all (no gks_<i> adapter)'} (create_arrow_model's "
                             "general_adapter_paths)")


dispatch.BY_FIELD[FIELD] = ArrowAdapter
dispatch.NEW_ADAPTER_CHECKS.append(check_new_adapter)
dispatch.AFTER_INJECT.append(link)


# -- create_arrow_model -----------------------------------------------------------------------------------------
def _folder(field: str, i: int, path: Any) -> str:
    """A saved LoRA adapter's folder, checked before anything loads."""
    where = f"create_arrow_model: {field}[{i}] = {path!r}"
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: expected a folder path")
    folder = os.fspath(path)
    config_file = os.path.join(folder, "adapter_config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{where}: no such folder (peftkit loads adapters from local folders)")
    if not os.path.isfile(config_file):
        raise ValueError(f"{where}: the folder does not contain 'adapter_config.json'")
    with open(config_file, encoding="utf-8") as fh:
        peft_type = json.load(fh).get("peft_type")
    if str(peft_type) != "LORA":
        raise ValueError(f"{where}: Arrow combines LoRA adapters; this one has peft_type {peft_type!r}")
    return folder


def _layout(model: Any, name: str) -> dict[str, tuple]:
    """Layer path -> (base type, A shape, B shape) of adapter ``name``."""
    out = {}
    for path, layer in adapter_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            out[path] = (type(layer.base_layer), tuple(getattr(a, "lora_A", torch.empty(0)).shape),
                         tuple(getattr(a, "lora_B", torch.empty(0)).shape))
    return out


def check_experts(model: Any, sources: dict[str, str]) -> tuple[list[str], int]:
    """peft's ``check_loaded_lora_compatibility_arrow`` and ``ensure_adapters_target_linear_layers_only``, per
    layer: every expert (name -> where it came from) adapts the same Linear layers with the same rank and shapes.
    Returns (sorted target module names, the rank)."""
    ref_name, ref = None, None
    for name, source in sources.items():
        layout = _layout(model, name)
        bad = sorted(p for p, (t, _, _) in layout.items() if not issubclass(t, (nn.Linear, *CONV1D_TYPES)))
        if bad:
            raise TypeError(f"{source}: LoRA adapters must only target Linear-like layers (nn.Linear, GPT-2's "
                            f"Conv1D) for Arrow; adapter {name!r} adapts {bad[0]} "
                            f"({layout[bad[0]][0].__name__}){f' and {len(bad) - 1} more' if len(bad) > 1 else ''}")
        if ref is None:
            ref_name, ref = source, layout
            continue
        if set(layout) != set(ref):
            extra, lacking = sorted(set(layout) - set(ref)), sorted(set(ref) - set(layout))
            raise ValueError(f"{source}: target_modules mismatch with {ref_name}: adapter {name!r} also adapts "
                             f"{extra[:3]} and lacks {lacking[:3]}; Arrow's experts must adapt the same layers")
        for path, (_, a_shape, b_shape) in layout.items():
            if a_shape[0] != ref[path][1][0]:
                raise ValueError(f"{source}: rank mismatch: r={a_shape[0]} on {path}, but {ref_name} has "
                                 f"r={ref[path][1][0]}; Arrow's experts must share one rank")
            if (a_shape, b_shape) != ref[path][1:]:
                raise ValueError(f"{source}: shape mismatch on {path}: {(a_shape, b_shape)} != {ref[path][1:]}")
    ranks = {shapes[1][0] for shapes in ref.values()}
    if len(ranks) != 1:
        raise ValueError(f"{ref_name}: rank_pattern gives the layers ranks {sorted(ranks)}; the Arrow router takes "
                         "one rank r for every layer")
    return sorted({p.rpartition(".")[2] for p in ref}), int(ranks.pop())


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: ArrowConfig,
                       general_adapter_paths: list[str] | None = None, **adapter_kwargs: Any) -> Any:
    """peft's ``create_arrow_model``: a ``PeftModel`` on ``base_model`` holding the LoRA experts saved in
    ``task_specific_adapter_paths`` (as ``task_0, task_1, ...``), the general adapters of ``general_adapter_paths``
    (``gks_0, ...``, with ``arrow_config.use_gks``) and the active router ``arrow_router``. Folders written by peft
    or peftkit; ``adapter_kwargs`` go to ``from_pretrained`` / ``load_adapter``. ``arrow_config`` gets the adapter
    names (as peft). On an error ``base_model`` is left as it was."""
    if not task_specific_adapter_paths:
        raise ValueError("create_arrow_model: `task_specific_adapter_paths` should contain at least one adapter path")
    arrow = arrow_subconfig(arrow_config)
    if arrow is None:
        raise TypeError("create_arrow_model: arrow_config: expected an ArrowConfig, got None")
    tasks = [_folder("task_specific_adapter_paths", i, p) for i, p in enumerate(task_specific_adapter_paths)]
    general: list[str] = []
    if arrow.use_gks:
        if not general_adapter_paths:
            raise ValueError("create_arrow_model: general_adapter_paths: you should provide general LoRA paths if you "
                             "want to use GenKnowSub (ArrowConfig.use_gks=True)")
        general = [_folder("general_adapter_paths", i, p) for i, p in enumerate(general_adapter_paths)]
    if arrow.top_k > len(tasks):
        raise ConfigError(f"ArrowConfig.top_k={arrow.top_k}: larger than the number of task-specific experts "
                          f"({len(tasks)} task_specific_adapter_paths); expected 1 <= top_k <= {len(tasks)}")
    task_names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(tasks))]
    gks_names = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general))]
    sources = {n: f"create_arrow_model: task_specific_adapter_paths[{i}] = {p!r}"
               for i, (n, p) in enumerate(zip(task_names, tasks))}
    sources.update({n: f"create_arrow_model: general_adapter_paths[{i}] = {p!r}"
                    for i, (n, p) in enumerate(zip(gks_names, general))})
    model = PeftModel.from_pretrained(base_model, tasks[0], adapter_name=task_names[0], **adapter_kwargs)
    try:
        for name, folder in zip(task_names[1:] + gks_names, tasks[1:] + general):
            model.load_adapter(folder, adapter_name=name, **adapter_kwargs)
        targets, r = check_experts(model, sources)
        arrow.task_adapter_names, arrow.gks_adapter_names = task_names, gks_names
        model.add_adapter(ROUTER_NAME, LoraConfig(arrow_config=arrow, target_modules=targets, r=r))
        model.set_adapter(ROUTER_NAME)
    except BaseException:
        model.unload()  # base_model as it was: its modules back, no adapter left
        raise
    if arrow is not arrow_config:  # peft's own ArrowConfig: given the names too, as peft's function does
        arrow_config.task_adapter_names, arrow_config.gks_adapter_names = task_names, gks_names
    return model
