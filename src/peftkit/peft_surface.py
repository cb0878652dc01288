"""peft's layer API on peftkit's wrapper: what tools and scripts call on an adapted module.

diffusers' ``set_adapters`` / ``fuse_lora``, transformers' adapter methods and common scripts reach into
peft's layer objects: ``module.lora_A[name].weight``, ``module.scaling[name]``, ``module.r[name]``,
``set_scale``, ``set_adapter``, ``enable_adapters``, ``delete_adapter``, ``get_base_layer()``,
``get_delta_weight(name)``. :class:`PeftLayerSurface` gives :class:`~peftkit.layers.AdapterLayer` that API as
views onto the adapters' own parameters and attributes (never copies): writing
``module.lora_A["default"].weight.data`` writes the adapter's tensor.

File-key views: ``module.<stem>[name].weight`` (or ``module.<stem>[name]`` for a key with no ``.weight``)
is the adapter parameter that the file stores under ``<path>.<stem>.weight`` / ``<path>.<stem>``, from the
adapter's ``checkpoint_keys``: ``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_magnitude_vector``,
``hada_w1_a``, ``ia3_l`` ...
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn


class _WeightView(nn.Module):
    """``lora_A[name]``: a module-like view whose ``.weight`` is the adapter's parameter."""

    def __init__(self, adapter: nn.Module, param: str) -> None:
        super().__init__()
        object.__setattr__(self, "_adapter", adapter)
        object.__setattr__(self, "_param", param)

    @property
    def weight(self) -> Tensor:
        return getattr(self._adapter, self._param)

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError(f"{self._param} is a view onto a peftkit adapter's parameter, not a layer to call")


class _AdapterMap(Mapping):
    """adapter name -> value, read live from the wrapper's adapters."""

    def __init__(self, layer: Any, read: Any, write: Any = None) -> None:
        self._layer, self._read, self._write = layer, read, write

    def _items(self) -> dict[str, Any]:
        out = {}
        for name, adapter in self._layer.adapters.items():
            value = self._read(adapter)
            if value is not None:
                out[name] = value
        return out

    def __getitem__(self, name: str) -> Any:
        return self._items()[name]

    def __setitem__(self, name: str, value: Any) -> None:
        if self._write is None or name not in self._items():
            raise KeyError(f"{name!r}: not settable here")
        self._write(self._layer.adapters[name], value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def keys(self):  # noqa: ANN201 - a dict's keys view
        return self._items().keys()

    def __repr__(self) -> str:
        return repr(self._items())


def _file_key_param(adapter: nn.Module, stem: str) -> tuple[str, bool] | None:
    """(parameter name, stored as ``<stem>.weight``) for the file key stem, or None."""
    for param, suffix in getattr(adapter, "checkpoint_keys", {}).items():
        if suffix == stem:
            return param, False
        if suffix == f"{stem}.weight":
            return param, True
    return None


class PeftLayerSurface:
    """Mixed into AdapterLayer: peft's ``BaseTunerLayer`` / ``LoraLayer`` API over peftkit's adapters."""

    adapters: nn.ModuleDict
    active_adapters: list[str]
    disable_adapters: bool

    def get_base_layer(self) -> nn.Module:
        return self.base_layer  # type: ignore[attr-defined]

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate these adapters on this layer; they train unless ``inference_mode`` (peft's layer rule)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.set_active(names)  # type: ignore[attr-defined]
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in names and not inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.adapters:
            self.remove(adapter_name)  # type: ignore[attr-defined]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's weight delta in the base weight's layout (weight-delta methods)."""
        return self.adapters[adapter].delta_weight(self.base_layer)  # type: ignore[attr-defined]

    # -- scaling (LoRA-family adapters that keep ``scaling`` and ``unit_scaling``) ---------------------
    @property
    def scaling(self) -> Mapping[str, float]:
        return _AdapterMap(self, lambda a: getattr(a, "scaling", None), lambda a, v: setattr(a, "scaling", v))

    @property
    def r(self) -> Mapping[str, int]:
        return _AdapterMap(self, lambda a: getattr(a, "r", None))

    @property
    def lora_alpha(self) -> Mapping[str, float]:
        return _AdapterMap(self, lambda a: getattr(a, "lora_alpha", None))

    def set_scale(self, adapter: str, scale: float) -> None:
        """Scaling of ``adapter`` = ``scale`` x its configured scaling (alpha / r)."""
        if adapter in self.adapters and hasattr(self.adapters[adapter], "unit_scaling"):
            a = self.adapters[adapter]
            a.scaling = scale * a.unit_scaling

    def scale_layer(self, scale: float) -> None:
        """Multiply the active adapters' scaling by ``scale``."""
        if scale == 1:
            return
        for name in self.active_adapters:
            a = self.adapters[name] if name in self.adapters else None
            if a is not None and hasattr(a, "unit_scaling"):
                a.scaling *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo :meth:`scale_layer` (``scale``), or back to the configured scaling (None)."""
        for name in self.active_adapters:
            a = self.adapters[name] if name in self.adapters else None
            if a is None or not hasattr(a, "unit_scaling"):
                continue
            a.scaling = a.unit_scaling if scale is None else a.scaling / scale

    # -- file-key views ----------------------------------------------------------------------------------
    def _peft_view(self, stem: str) -> Mapping[str, Any] | None:
        """``module.<stem>`` as peft names it (``lora_A``, ``ia3_l`` ...): adapter name -> view."""
        adapters = self.__dict__.get("_modules", {}).get("adapters")
        if adapters is None:
            return None
        found = {}
        for name, adapter in adapters.items():
            hit = _file_key_param(adapter, stem)
            if hit is not None:
                param, as_weight = hit
                found[name] = _WeightView(adapter, param) if as_weight else getattr(adapter, param)
        return found or None
