"""The adapter every delta-based selective method shares.

A selective method changes existing parameters. Here it never writes them while training: the adapter on
the module that owns a selected parameter holds a trainable delta for the selected entries, and the layer
computes with ``W0 + delta``. So

- the base weights stay frozen and untouched; disabling skips the delta (no copy of anything);
- optimizer state is the size of the selected entries (``values`` for a sparse selection);
- merging writes ``W0 + delta`` into the base (the wrapper restores it bit for bit on unmerge);
- the checkpoint holds only what changed (``config.py`` lists the storage formats).

Subclasses decide which parameters and entries are selected (``select``) and may shape the delta
(``dense``: gates for diff pruning, a gradient mask for Child-Tuning F).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...layers import Adapter
from .config import SelectionError
from .functional import DeltaBuilder, ReparamOp, channel_shape, weight_op
from .select import check_fits, delta_dtype, eligible, entries_for, index_dtype


class SelectiveAdapter(Adapter):
    """Deltas for some of one module's own parameters (see the module docstring)."""

    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)
    default_roles: ClassVar[tuple[str, ...]] = ()
    method: ClassVar[str] = "selective"

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.key = key
        self.formats: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.checkpoint_keys = {}
        self.merged_params = ()
        self.op = weight_op(base)
        entries = entries_for(config, key)
        self.pending = entries is None  # a data-dependent selection not made yet (see prepare_selection)
        for pname, spec in (entries or {}).items():
            self._allocate(base, pname, spec, config, init)

    # -- selection (class level: which modules and entries) ------------------------------------------------
    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        """Fill ``config.selected_params`` for a fresh adapter (leave it None when data is needed first)."""
        raise NotImplementedError

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        """The modules to wrap: those of the recorded selection (checked against the model's shapes), or
        of a fresh one; while a data-dependent selection is pending, every eligible module."""
        if config.selected_params is None:
            cls.select(model, named, config)
        if config.selected_params is None:
            return list(dict.fromkeys(path for path, _, _ in cls.eligible(model, named, config)))
        return check_fits(named, config.selected_params)

    @classmethod
    def eligible(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any):
        return eligible(model, named, config)

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """Closed form of the stored trainable entries: ``nnz`` for a sparse selection, the parameter's size
        for a full or masked one (a dense delta), twice that for diff pruning's gated deltas."""
        sizes = {"sparse": lambda s: s["nnz"], "gated": lambda s: 2 * _numel(s["shape"])}
        entries = entries_for(config, key) or {}
        return sum(sizes.get(s["format"], lambda s: _numel(s["shape"]))(s) for s in entries.values())

    # -- storage -------------------------------------------------------------------------------------------
    def _allocate(self, base: nn.Module, pname: str, spec: dict[str, Any], config: Any, init: bool) -> None:
        param = base._parameters[pname]
        fmt, shape, nnz = spec["format"], tuple(spec["shape"]), spec["nnz"]
        kw = {"device": param.device, "dtype": delta_dtype(param)}
        self.formats[pname], self.shapes[pname] = fmt, shape
        if fmt == "sparse":
            self._add(pname, "indices", torch.zeros(nnz, dtype=index_dtype(param.numel()), device=param.device))
            self._add(pname, "values", nn.Parameter(torch.zeros(nnz, **kw)))
        else:
            self._add(pname, "delta", nn.Parameter(torch.zeros(shape, **kw)))
            if fmt == "masked":
                self._add(pname, "mask", torch.zeros(shape, dtype=torch.bool, device=param.device))
            elif fmt == "gated":
                self._add(pname, "log_alpha", nn.Parameter(torch.full(shape, float(config.alpha_init), **kw)))
        self.merged_params = self.merged_params + (pname,)
        if init and fmt in ("sparse", "masked"):
            self.set_indices(pname, self.initial_indices(base, pname, nnz, config))

    def _add(self, pname: str, kind: str, tensor: Tensor) -> None:
        name = f"{pname}_{kind}"
        if isinstance(tensor, nn.Parameter):
            self.register_parameter(name, tensor)
        else:
            self.register_buffer(name, tensor)
        self.checkpoint_keys[name] = f"{pname}.{kind}"  # file key: <module path>.<param>.<kind>

    def initial_indices(self, base: nn.Module, pname: str, nnz: int, config: Any) -> Tensor:
        raise SelectionError(
            f"{self.key}.{pname}: the selection is data-dependent and its indices are not in the config; "
            "load the saved adapter (PeftModel.from_pretrained) or call model.prepare_selection(...)"
        )

    @torch.no_grad()
    def set_indices(self, pname: str, indices: Tensor) -> None:
        """Install the selected flat indices (sorted) of a sparse or masked parameter."""
        if self.formats[pname] == "sparse":
            buf = getattr(self, f"{pname}_indices")
            buf.copy_(indices.to(buf.device, buf.dtype))
        else:
            mask = getattr(self, f"{pname}_mask")
            mask.zero_()
            mask.view(-1)[indices.to(mask.device, torch.long)] = True

    def index(self, pname: str) -> Tensor:
        return getattr(self, f"{pname}_indices")

    def theta(self, pname: str) -> tuple[Tensor, ...]:
        """The trainable tensors behind one parameter's delta."""
        fmt = self.formats[pname]
        if fmt == "sparse":
            return (getattr(self, f"{pname}_values"),)
        if fmt == "gated":
            return getattr(self, f"{pname}_delta"), getattr(self, f"{pname}_log_alpha")
        return (getattr(self, f"{pname}_delta"),)

    def dense(self, pname: str, theta: tuple[Tensor, ...] | None = None, state: Any = None) -> Tensor:
        """The delta of one parameter in its full shape (differentiable in ``theta``)."""
        theta = self.theta(pname) if theta is None else theta
        fmt, shape = self.formats[pname], self.shapes[pname]
        if fmt == "sparse":
            vals = theta[0]
            flat = torch.zeros(_numel(shape), dtype=vals.dtype, device=vals.device)
            return flat.index_add(0, self.index(pname), vals).view(shape)
        if fmt == "masked":
            return theta[0] * getattr(self, f"{pname}_mask")
        return theta[0]

    def forward_state(self) -> Any:
        """Per-forward random state a subclass's ``dense`` needs (diff pruning's gate noise); None here."""
        return None

    # -- forward -------------------------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.pending and self.training and torch.is_grad_enabled():
            raise SelectionError(
                f"{self.method} adapter at {self.key!r} has no mask yet: call "
                "model.prepare_selection(dataloader, loss_fn) before training"
            )

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        self._check_ready()
        if self.pending or base._forward_hooks or base._forward_pre_hooks:
            return None  # the wrapper runs the base (and its hooks), then ``forward``
        return self._run(base, x, with_base=True)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        self._check_ready()
        if self.pending or not self.formats:
            return out
        return out + self._run(base, x, with_base=False).to(out.dtype)

    def _run(self, base: nn.Module, x: Tensor, with_base: bool) -> Tensor:
        """``base`` computed with ``W0 + delta`` (``with_base``), or the adapter's additive contribution."""
        state = self.forward_state()
        if self.op is None:  # generic module (norms ...): small parameters, plain autograd
            params = {p: base._parameters[p] + self.dense(p, None, state).to(base._parameters[p].dtype)
                      for p in self.formats}
            y = torch.func.functional_call(base, params, (x,))
            return y if with_base else y - base(x)
        b0 = base._parameters.get("bias")
        db = self.dense("bias", None, state) if "bias" in self.formats else None
        if with_base:
            bias = b0 if db is None else b0 + db.to(b0.dtype)
        else:
            bias = db
        if "weight" not in self.formats:  # bias only (BitFit): the frozen weight needs no copy
            if with_base:
                return self.op.forward(x, base.weight, bias)
            return bias.reshape(channel_shape(base, x.dim()))
        builder = DeltaBuilder(self, "weight", state)
        return ReparamOp.apply(x, bias, self.op, base.weight if with_base else None, builder, *self.theta("weight"))

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """``value + delta``, differentiable as in the forward (gates, gradient masks); for a caller that reads
        the parameter instead of calling the layer (``nn.MultiheadAttention``'s out_proj, see ``peftkit.mha``)."""
        self._check_ready()
        if self.pending or name not in self.formats:
            return value
        return value + self.dense(name, None, self.forward_state()).to(value.dtype)

    # -- merge ---------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        with torch.no_grad():
            return self.dense("weight").detach()

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        with torch.no_grad():
            return value + self.dense(name).detach().to(value.dtype)

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        with torch.no_grad():
            return value - self.dense(name).detach().to(value.dtype)

    def selected_count(self, pname: str) -> int:
        """How many entries of a base parameter this adapter may change."""
        fmt = self.formats[pname]
        if fmt == "sparse":
            return self.index(pname).numel()
        if fmt == "masked":
            return int(getattr(self, f"{pname}_mask").sum())
        return _numel(self.shapes[pname])

    def extra_repr(self) -> str:
        parts = [f"{p}: {f} {self.selected_count(p)}/{_numel(self.shapes[p])}" for p, f in self.formats.items()]
        return "pending selection" if self.pending else ", ".join(parts)


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
