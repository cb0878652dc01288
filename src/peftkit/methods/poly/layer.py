"""Polytropon (Ponti et al. 2022, arXiv 2202.13914) and Multi-Head Routing (Caccia et al. 2022, arXiv 2211.03831):
per-task routing over an inventory of LoRA skills, on Linear and GPT-2 Conv1D layers.

Each adapted layer holds ``s`` LoRA skills ``(A_j, B_j)`` and a router: per task ``t`` a learned row of module
logits ``Z_t``. A batch row of task ``t`` runs the layer with the skills averaged by its routing weights:

    w = sigma(Z_t) / sum_j sigma(Z_t)_j              (eval; training: a relaxed-Bernoulli sample, temperature 1)
    h = W x + (1 / r) x (sum_j w_j A_j) (sum_j w_j B_j)

Multi-Head Routing (``n_splits = q > 1``) cuts the input and output features into ``q`` slices, each with its
own skills and routing weights: ``A`` is (q, s, d_in / q, r), ``B`` (q, s, r, d_out / q), ``Z`` (n_tasks, q s).
Trained: ``A``, ``B`` and ``Z``; the base layer is frozen. ``init_weights=True``: ``A`` Kaiming uniform (as
``nn.Linear``, one draw per skill and split), ``B`` zero (the model starts at the base), ``Z`` uniform in
[-1e-3, 1e-3].

As Hugging Face PEFT (files ``poly_lora_A``, ``poly_lora_B``, ``poly_router.module_logits``; the same numbers).
The task of each row comes with the call, ``model(input_ids, task_ids=...)`` or ``generate(..., task_ids=...)``:
``call_context`` takes it out of the call's arguments, checks it (one id per row, each in ``[0, n_tasks)``) before
anything runs and holds it for the call in a thread-local (never on the layers). Differences from PEFT: with
``n_tasks = 1`` ``task_ids`` may be left out (every row is task 0; PEFT raises); ids are also checked for being
negative, and for their count against the batch; generation that expands the batch (``num_beams``,
``num_return_sequences``) repeats each row's task id (PEFT fails on the shapes); GPT-2's Conv1D is wrapped too
(PEFT wraps ``nn.Linear`` only). A mixed batch (``adapter_names``) is refused: routing is by ``task_ids``.
Not mergeable: the effective weight depends on the row's task.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, layer_dims
from ...layers import Adapter
from ...registry import register_method
from . import functional as PF
from .config import PolyConfig

_SUPPORTED = (nn.Linear,) + CONV1D_TYPES


class _Local(threading.local):
    task_ids: Tensor | None = None  # this thread's call: one task id per batch row (None: every row is task 0)
    same: bool = False  # every row has the same task


_LOCAL = _Local()


@contextlib.contextmanager
def task_scope(task_ids: Tensor | None) -> Iterator[None]:
    """Within the block, and only in this thread, Poly layers route row i by ``task_ids[i]``."""
    outer = (_LOCAL.task_ids, _LOCAL.same)
    _LOCAL.task_ids = task_ids
    _LOCAL.same = task_ids is None or bool((task_ids == task_ids[:1]).all())
    try:
        yield
    finally:
        _LOCAL.task_ids, _LOCAL.same = outer


def batch_rows(call: dict[str, Any]) -> int | None:
    """The batch size of a forward / generate call, from its token or embedding inputs (None: not found)."""
    kwargs, args = call["kwargs"], call["args"]
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            return value.shape[0] if value.dim() > 1 else 1
    if args and isinstance(args[0], Tensor):
        return args[0].shape[0] if args[0].dim() > 1 else 1
    return None


def check_task_ids(task_ids: Any, n_tasks: int, rows: int | None, who: str) -> Tensor:
    """``task_ids`` as a 1-D long tensor, after checking it holds one integer per batch row, each in
    ``[0, n_tasks)``; ValueError naming ``task_ids`` and the allowed range otherwise."""
    allowed = f"one integer per batch row, each in [0, {n_tasks})"
    ids = task_ids if isinstance(task_ids, Tensor) else torch.as_tensor(task_ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"task_ids: {who} expects {allowed} (n_tasks={n_tasks}), got a {ids.dtype} tensor of "
                         f"shape {tuple(ids.shape)}")
    if rows is not None and ids.shape[0] != rows:
        raise ValueError(f"task_ids: {who} expects {allowed} (n_tasks={n_tasks}); got {ids.shape[0]} ids for "
                         f"{rows} rows")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_tasks):
        raise ValueError(f"task_ids: {who} expects {allowed} (n_tasks={n_tasks}), got {ids.tolist()}")
    return ids.long()


def _poly_configs(model: Any) -> dict[str, PolyConfig]:
    """The model's active Poly adapters (name -> config)."""
    configs = model.peft_config
    return {n: configs[n] for n in model.active_adapters if isinstance(configs.get(n), PolyConfig)}


def _disabled(model: Any) -> bool:
    return any(layer.disable_adapters for _, layer in model.base_model.adapter_layers())


@register_method(
    "poly",
    config=PolyConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=False,
    param_formula="s r (d_in + d_out) + n_tasks q s per target (s skills, q splits)",
    position="task-routed mixture of LoRA skills beside each targeted layer",
    paper="arXiv 2202.13914 (Polytropon), arXiv 2211.03831 (MHR)",
    examples={"poly": {"r": 2, "n_skills": 3, "n_splits": 2}},
)
class PolyAdapter(Adapter):
    supported_layers = _SUPPORTED
    supports_routing = False  # rows are routed by task_ids, not by adapter_names
    default_roles = ("query", "value")  # PEFT's Poly defaults are its LoRA defaults
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "poly_lora_A": "poly_lora_A", "poly_lora_B": "poly_lora_B", "module_logits": "poly_router.module_logits",
    }

    def __init__(self, base: nn.Module, config: PolyConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not isinstance(base, _SUPPORTED):
            raise TypeError(f"{key}: Poly wraps Linear and GPT-2 Conv1D layers, not {type(base).__name__}")
        d_out, d_in = layer_dims(base)
        q, s, r = config.n_splits, config.n_skills, config.r
        if d_in % q or d_out % q:
            raise ValueError(f"PolyConfig.n_splits: {key or 'a target'} has {d_in} input and {d_out} output features; "
                             f"n_splits={q} must divide both (allowed: a common divisor of {d_in} and {d_out})")
        self.r, self.n_splits, self.n_skills, self.n_tasks = r, q, s, config.n_tasks
        self.d_in, self.d_out = d_in, d_out
        dev, dtype = base.weight.device, adapter_dtype(base)
        self.poly_lora_A = nn.Parameter(torch.empty(q, s, d_in // q, r, device=dev, dtype=dtype))
        self.poly_lora_B = nn.Parameter(torch.empty(q, s, r, d_out // q, device=dev, dtype=dtype))
        self.module_logits = nn.Parameter(torch.empty(config.n_tasks, q * s, device=dev, dtype=dtype))
        if init:
            self._reset(config.init_weights)

    @torch.no_grad()
    def _reset(self, init_weights: bool) -> None:
        """PEFT's ``reset_poly_parameters``, draw for draw: A (and B unless zero) one nn.Linear-style Kaiming
        uniform matrix per skill and split, transposed; then the router's logits uniform in [-1e-3, 1e-3]."""
        q, s, d, r = self.poly_lora_A.shape
        for skill in range(s):
            for split in range(q):
                m = torch.empty(r, d)
                nn.init.kaiming_uniform_(m, a=math.sqrt(5))
                self.poly_lora_A[split, skill] = m.T
        if init_weights:
            nn.init.zeros_(self.poly_lora_B)
        else:
            d_b = self.poly_lora_B.shape[-1]
            for skill in range(s):
                for split in range(q):
                    m = torch.empty(d_b, r)
                    nn.init.kaiming_uniform_(m, a=math.sqrt(5))
                    self.poly_lora_B[split, skill] = m.T
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    @classmethod
    def param_count(cls, base: nn.Module, config: PolyConfig, key: str = "") -> int:
        """Closed form: s r (d_in + d_out) (skills) + n_tasks q s (the router's logits)."""
        d_out, d_in = layer_dims(base)
        s = config.n_skills
        return s * config.r * (d_in + d_out) + config.n_tasks * config.n_splits * s

    # -- the call's task ids --------------------------------------------------------------------------------
    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> Any:
        """Take ``task_ids`` out of the call (kept in ``call["task_ids"]`` for other methods routed by task), check
        it against the active Poly adapters' ``n_tasks`` and the batch, and hold it for the call."""
        if "task_ids" not in call:
            call["task_ids"] = call["kwargs"].pop("task_ids", None)
        ids = call["task_ids"]
        polys = _poly_configs(model)
        if not polys:
            return None
        name, config = min(polys.items(), key=lambda kv: kv[1].n_tasks)
        who = f"Poly adapter {name!r}"
        if ids is None:
            if config.n_tasks == 1 or _disabled(model):
                return task_scope(None)
            raise ValueError(f"task_ids: required by {who} (n_tasks={config.n_tasks}): pass one integer per batch "
                             f"row, each in [0, {config.n_tasks}), as model(..., task_ids=...)")
        return task_scope(check_task_ids(ids, config.n_tasks, batch_rows(call), who))

    # -- forward --------------------------------------------------------------------------------------------
    def _row_tasks(self, rows: int) -> Tensor | None:
        """Task id per row of this layer's input (a batch that generation expanded repeats each row's id)."""
        ids = _LOCAL.task_ids
        if ids is None:
            return None
        if ids.shape[0] != rows:
            if ids.shape[0] == 0 or rows % ids.shape[0]:
                raise ValueError(f"task_ids: {ids.shape[0]} ids for a batch of {rows} rows through this layer; give "
                                 "one task id per batch row")
            ids = ids.repeat_interleave(rows // ids.shape[0])
        return ids.to(self.module_logits.device)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        rows = x.shape[0] if x.dim() > 1 else 1
        ids = self._row_tasks(rows)
        logits = self.module_logits
        shared = not self.training and (ids is None or _LOCAL.same)  # one set of factors for every row
        if shared:
            logits = logits[:1] if ids is None else logits[ids[:1]]
        else:
            logits = logits[ids] if ids is not None else logits[:1].expand(rows, -1)
        w = PF.mixing_weights(logits, self.n_splits, self.n_skills, self.training)
        a_rows, b_rows = PF.mixed_factors(w, self.poly_lora_A, self.poly_lora_B)
        xa = x.to(a_rows.dtype).reshape(rows, -1, self.d_in)
        y = PF.poly_add(out.to(a_rows.dtype).reshape(rows, -1, self.d_out), xa, a_rows, b_rows, self.r)
        return y.view(out.shape).to(out.dtype)
