"""AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers", arXiv 2010.11918).

Bottleneck adapters (Houlsby / Pfeiffer: ``h + W_up f(W_down h)``, see ``adapters/bottleneck.py``) are dropped from
the lowest n transformer layers: those layers run as the frozen base model, so at inference they cost nothing
beyond the base (and, across tasks, their activations are shared). Two variants, as the paper:

- specialised AdapterDrop (``drop_layers=n``): the lowest n layers never have an adapter, in training or at
  inference. Layers with index < n are not wrapped at all; the adapter's parameters are those of the layers
  kept, ``m (d_in + 1) + d (m + 1)`` per adapter.
- robust AdapterDrop (``stochastic=True``): every layer has an adapter; each training forward drops the lowest
  n layers' adapters with n drawn uniformly from {0, ..., ``max_drop_layers``} (one draw per forward of the model,
  by a forward pre-hook on it, so activation checkpointing's recomputation sees the same n); at inference any
  ``drop_layers`` may be chosen, and the layers below it skip the adapter computation (the layer returns the
  base's output as it is).

A layer's index is the number after its layer list in the module path (``encoder.layer.3.output.dense`` -> 3;
``layers_pattern`` names the list when the default rule does not find it); encoder-decoder models number both
stacks from 0, so both stacks' lowest n layers are dropped. The file holds the bottleneck's keys
(``<path>.adapter_down.weight`` ...) of the layers that have an adapter: the same tensors as a Pfeiffer / Houlsby
adapter with ``layers_to_transform`` set to the kept layers.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ...layers import adapter_layers
from ...registry import register_method
from ...targeting import NotApplicableError, TargetError, _layer_index
from ..adapters.bottleneck import VARIANT_META, BottleneckAdapter
from . import functional as AF
from .config import AdapterDropConfig

_HOOK = "_peftkit_adapterdrop_hook"


class DropState:
    """One adapter's robust-training draw: the n of the current training forward (shared by its layers)."""

    def __init__(self, config: AdapterDropConfig) -> None:
        self.config = config
        self.highest = 0  # the largest n a draw may give (set when the targets are known)
        self.n: int | None = None

    def draw(self) -> None:
        self.n = AF.draw_n(self.highest)

    def dropped_below(self, training: bool) -> int:
        """Layers with an index below this skip the adapter."""
        if training and self.config.stochastic and self.n is not None:
            return self.n
        return self.config.drop_layers


def _state(config: AdapterDropConfig) -> DropState:
    state = vars(config).get("_adapterdrop_state")
    if state is None:
        state = vars(config)["_adapterdrop_state"] = DropState(config)
    return state


meta = dict(VARIANT_META)
meta["position"] = "bottleneck modules after sublayers, none in the lowest n layers"


@register_method(
    "adapterdrop", config=AdapterDropConfig, modalities=("text", "vision", "vision-language", "generation"),
    paper="arXiv 2010.11918 (AdapterDrop)",
    examples={
        "adapterdrop": {"reduction_factor": 8.0, "init_weights": "lora", "drop_layers": 1},
        # robust: adapters on every layer, the lowest dropped at inference; the training draw is n = 0 here so
        # the contract's one training step reaches every adapter (tests/methods/test_adapterdrop.py draws n)
        "adapterdrop-robust": {"reduction_factor": 8.0, "init_weights": "lora", "drop_layers": 1,
                               "stochastic": True, "max_drop_layers": 0},
    },
    **meta,
)
class AdapterDropAdapter(BottleneckAdapter):
    """A bottleneck adapter that its layer skips when the layer's index is below the dropped count."""

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: AdapterDropConfig
                       ) -> list[str]:
        """The bottleneck's targets; without ``stochastic``, those of layers below ``drop_layers`` left out."""
        paths = super().select_targets(model, named, config)
        index = {p: _layer_index(p, config.layers_pattern) for p in paths}
        loose = [p for p, i in index.items() if i is None]
        if loose:
            raise NotApplicableError(f"AdapterDrop drops adapters by layer index; module {loose[0]!r} has none (set "
                                     "AdapterDropConfig.layers_pattern to the name of the model's layer list)")
        n_layers = max(index.values()) + 1
        state = _state(config)
        state.highest = config.max_drop_layers if config.max_drop_layers is not None else n_layers - 1
        if config.stochastic:
            return paths
        kept = [p for p in paths if index[p] >= config.drop_layers]
        if not kept:
            raise TargetError(f"AdapterDropConfig.drop_layers={config.drop_layers} drops every adapted layer (layer "
                              f"indices 0..{n_layers - 1}); expected drop_layers < {n_layers}")
        return kept

    def __init__(self, base: nn.Module, config: AdapterDropConfig, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        self.layer_index = _layer_index(key, config.layers_pattern)
        self.__dict__["state"] = _state(config)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor, gate: Callable[[Tensor], Tensor] | None = None
                ) -> Tensor:
        if AF.is_dropped(self.layer_index, self.state.dropped_below(self.training)):
            return out  # dropped: the layer is the base layer, no adapter computation
        return super().forward(base, x, out, gate)

    # -- robust training: one draw per forward of the model ---------------------------------------------------
    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        if _HOOK not in model.__dict__:
            model.__dict__[_HOOK] = model.register_forward_pre_hook(_draw)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        handle = model.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()


def _draw(model: nn.Module, args: Any) -> None:
    """Before a training forward: each robust AdapterDrop adapter draws the n its layers drop in this forward."""
    if not model.training:
        return
    states = {}
    for _, layer in adapter_layers(model):
        for adapter in layer.adapters.values():
            if isinstance(adapter, AdapterDropAdapter) and adapter.state.config.stochastic:
                states[id(adapter.state)] = adapter.state
    for state in states.values():
        state.draw()
