"""Adapters of different types active at once: ``PeftMixedModel`` and ``get_peft_model(..., mixed=True)``.

peft's mixed model (``peft.mixed_model`` / ``peft.tuners.mixed``) accepts LoRA, LoHa, LoKr, AdaLoRA and OFT
(and SHiRA, which peftkit lacks) and *nests* layers: an adapter whose type differs from the outermost tuner
layer on a module wraps that layer in a new one; an adapter of the same type as the outermost one joins it.
Each tuner layer computes its adapters around whatever it wraps, given the input it receives:

- LoRA, LoHa, LoKr, AdaLoRA: ``out = inner(x) + delta(x)`` (x: this layer's input);
- OFT: ``x = R_k .. R_1 x`` (its active adapters in the order of the active list), then ``out = inner(x)``:
  everything nested inside an OFT layer, adapters included, sees the rotated input.

So the insertion order matters once a non-additive method takes part: LoRA added after OFT gives
``W R x + b + B A x``; OFT added after LoRA gives ``(W + B A) R x + b``.

peftkit keeps one wrapper per module, and :class:`MixedLayer` records the nesting as an ordered composition:
``stages``, innermost first, each ``(adapter class, names)`` (peft's tuner layers). Its forward folds the
stages from the outermost in, each adapter through the generic hook ``Adapter.forward_around(base, x,
inner)`` (default: act on ``inner(x)``'s output; OFT: run ``inner`` on the rotated input); no method is named
here. Merging follows the same order from the inside out, so merged outputs equal the unmerged ones.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import PeftConfig
from .layers import AdapterLayer
from .tuner import TunerModel

# peft's COMPATIBLE_TUNER_TYPES less SHIRA (not a peftkit method)
COMPATIBLE_TUNER_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT")
PEFT_SHIRA = "SHIRA"


def _check_config_compatible(peft_config: PeftConfig) -> None:
    """peft's ``_check_config_compatible``: only the compatible adapter types (ValueError otherwise)."""
    peft_type = str(getattr(peft_config, "peft_type", None))
    if peft_type not in COMPATIBLE_TUNER_TYPES:
        extra = " (SHIRA, also compatible in peft, is not a peftkit method)" if peft_type == PEFT_SHIRA else ""
        raise ValueError(f"The provided `peft_type` '{peft_type}' is not compatible with the `PeftMixedModel`. "
                         f"Compatible types are: {COMPATIBLE_TUNER_TYPES}{extra}")


class MixedLayer(AdapterLayer):
    """An ``AdapterLayer`` whose adapters are nested as peft's mixed model nests its tuner layers.

    ``stages`` (innermost first) is a tuple of ``(adapter class, names)``: a new adapter joins the outermost
    stage when it is of that stage's class, else it opens a new outermost stage (peft: it joins the outermost
    tuner layer of its own type, else wraps it). A deleted adapter leaves its stage in place, even empty (peft
    keeps the emptied tuner layer), so later additions nest as they do in peft. Within a stage, the active
    adapters run in the order of the active list, the first outermost (peft's layers loop over their active
    adapters: OFT rotates by the first one first; additive methods commute).

    Forward: the stages are folded from the outermost in, each adapter through ``Adapter.forward_around``
    around the rest; the innermost adapter with nothing nested inside it runs through its own ``forward`` (or
    ``fused_forward``) as in the flat ``AdapterLayer``. Merge: innermost first, so the merged weight computes
    the same function; unmerge undoes in reverse (the base's exact restore). The tuple is replaced, never
    mutated, so a failed load's undo (``checkpoint.Undo``) restores it.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.stages: tuple[tuple[type, tuple[str, ...]], ...] = ()

    def add(self, name: str, adapter: Any) -> None:
        super().add(name, adapter)
        kind = type(adapter)
        if self.stages and self.stages[-1][0] is kind:
            self.stages = (*self.stages[:-1], (kind, (*self.stages[-1][1], name)))
        else:
            self.stages = (*self.stages, (kind, (name,)))

    def remove(self, name: str) -> None:
        super().remove(name)
        self.stages = tuple((kind, tuple(n for n in names if n != name)) for kind, names in self.stages)

    def nesting(self, names: list[str] | None = None) -> list[str]:
        """``names`` (default: the active adapters) from the outermost to the innermost."""
        names = list(self.active_adapters) if names is None else [n for n in names if n in self.adapters]
        order = []
        for _, stage in reversed(self.stages):
            order += [n for n in names if n in stage]  # the list's order within a stage (peft's layers)
        return order

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        chain = [n for n in self.nesting() if n not in self.merged_adapters and self.adapters[n].changes_output]
        base = self.base_layer
        if len(chain) == 1 and not args and not kwargs:
            fused = self.adapters[chain[0]].fused_forward(base, x)
            if fused is not None:
                return fused

        def run(i: int, z: Tensor) -> Tensor:
            if i == len(chain):
                return base(z, *args, **kwargs)
            adapter = self.adapters[chain[i]]
            if i == len(chain) - 1:  # nothing nested inside: the method's own forward, as the flat layer
                return adapter(base, z, base(z, *args, **kwargs))
            inner: Callable[[Tensor], Tensor] = lambda y: run(i + 1, y)  # noqa: E731
            return adapter.forward_around(base, z, inner)

        return run(0, x)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge innermost first (reversed nesting), so the merged layer computes the nested function."""
        names = self.active_adapters if adapter_names is None else adapter_names
        super().merge(list(reversed(self.nesting(list(names)))), safe_merge=safe_merge)

    def extra_repr(self) -> str:
        stages = [f"{kind.__name__}{list(names)}" for kind, names in self.stages]
        return f"{super().extra_repr()}, nesting (inner -> outer)={stages}"


class MixedModel(TunerModel):
    """peft's ``MixedModel`` tuner: the generic tuner with :class:`MixedLayer` wrappers, compatible types only."""

    wrapper_cls = MixedLayer

    def inject(self, config: PeftConfig, adapter_name: str, init: bool = True, meta: bool = False) -> None:
        _check_config_compatible(config)
        super().inject(config, adapter_name, init=init, meta=meta)

    def extra_loss(self) -> torch.Tensor | None:
        """None: peft's mixed model adds no method's loss term (AdaLoRA's penalty is AdaLoraModel's)."""
        return None

    def set_adapter(self, names: str | list[str], inference_mode: bool | None = None) -> None:
        """As peft's MixedModel: merged layers are unmerged first (with a warning)."""
        for _, layer in self.adapter_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.",
                              stacklevel=3)
                layer.unmerge()
        super().set_adapter(names, inference_mode=inference_mode)

    def delete(self, adapter_name: str) -> None:
        """As peft's mixed model: when the deleted adapter was the only active one, each of peft's tuner layers
        (here: each stage of each layer) activates its own first remaining adapter, so the model's active set is
        their union, and they train (peft's layers' ``set_adapter``); otherwise the others stay active."""
        was_active = adapter_name in self.active_adapters
        remaining = [a for a in self.active_adapters if a != adapter_name]
        super().delete(adapter_name)
        if not was_active or not self.peft_config:
            return
        if remaining:
            self.set_adapter(remaining, inference_mode=False)
            return
        union: list[str] = []
        for _, layer in self.adapter_layers():
            own = [names[0] for _, names in getattr(layer, "stages", ()) if names]
            layer.set_active(own)
            union += [n for n in own if n not in union]
        for name in union:
            self.peft_config[name].inference_mode = False
        self.active_adapters = union
        for _, wrapper in self.saved_modules():
            wrapper.active_adapter = next((n for n in union if n in wrapper.modules_to_save), None)
        self.mark_trainable()

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Delete one adapter or several (peft's MixedModel.delete_adapter); the names are checked first."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
        for name in names:
            self.delete(name)

    # peft's tuner methods, reached through PeftMixedModel.__getattr__
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return TunerModel.unload(self, merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:  # type: ignore[override]
        """peft's ``unload()`` (no merge); the generic ``unload(merge, ...)`` when called with its arguments."""
        if args or kwargs:
            return super().unload(*args, **kwargs)
        return super().unload(merge=False)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"Weighted adapters are not supported for {self.__class__.__name__} (yet).")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)


def _prepare_for_gradient_checkpointing(model: nn.Module) -> None:
    """peft's: a model with gradient checkpointing on gets inputs that require grad (unless quantized)."""
    if not getattr(model, "is_gradient_checkpointing", True):
        return
    if any(getattr(model, a, False) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def _resolve_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: adapter folder not found (peftkit loads from local folders only)")
    return folder


class PeftMixedModel(nn.Module):
    """peft's ``PeftMixedModel``: adapters of different types (LoRA, LoHa, LoKr, AdaLoRA, OFT) active at once,
    nested in the order they were added (see the module docstring). Usually made by
    ``get_peft_model(model, config, mixed=True)``, or ``from_pretrained`` + ``load_adapter`` (one folder per
    adapter, saved by a ``PeftModel``). As in peft it cannot save (``save_pretrained`` raises)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_config_compatible(peft_config)
        _prepare_for_gradient_checkpointing(model)
        self.modules_to_save: set[str] | None = None
        self.base_model = MixedModel(model)
        self.base_model.inject(peft_config, adapter_name)
        self._active: str | list[str] = adapter_name  # peft's active_adapter: as last given to set_adapter
        self._note_modules_to_save(peft_config)
        self.config = getattr(model, "config", {"model_type": "custom"})
        if hasattr(self.config, "pretraining_tp"):
            self.config.pretraining_tp = 1

    # -- state -------------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- running -----------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        try:
            self.base_model.disable_adapter_layers()
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # -- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter, nested around those already on its modules; inactive until ``set_adapter``."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        _check_config_compatible(peft_config)
        self.base_model.inject(peft_config, adapter_name, init=not low_cpu_mem_usage, meta=low_cpu_mem_usage)
        self._note_modules_to_save(peft_config)

    def _note_modules_to_save(self, peft_config: PeftConfig) -> None:
        names = getattr(peft_config, "modules_to_save", None)
        if names is not None:
            self.modules_to_save = set(names) if self.modules_to_save is None else self.modules_to_save | set(names)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapters (trainable unless ``inference_mode``). The order of application is the nesting
        (insertion) order, whatever the list's order, except among adapters of one stage (see MixedLayer)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(names, inference_mode=inference_mode)
        self._active = adapter_name

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.delete_adapter(adapter_name)
        self._active = list(self.base_model.active_adapters)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Fold the active adapters into the base weights, innermost first, and return the plain base model."""
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        return self.base_model.unload(*args, **kwargs)

    def get_layer_status(self) -> None:
        raise TypeError(f"get_layer_status is not supported for {self.__class__.__name__}.")

    def get_model_status(self) -> None:
        raise TypeError(f"get_model_status is not supported for {self.__class__.__name__}.")

    # -- files -------------------------------------------------------------------------------------------
    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError(f"Model card creation is not supported for {self.__class__.__name__} (yet).")

    def save_pretrained(self, save_directory: str, safe_serialization: bool = False,
                        selected_adapters: list[str] | None = None, **kwargs: Any) -> None:
        raise NotImplementedError(f"Saving is not supported for {self.__class__.__name__} (yet).")

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, **kwargs: Any) -> ckpt.LoadResult:
        """Load an adapter saved by a ``PeftModel`` (its own folder), nested around those already there (an
        existing ``adapter_name`` takes the weights in place). Then, as peft, ``set_adapter(active_adapters)``.
        On any error nothing changes."""
        folder = _resolve_folder(model_id, kwargs.get("subfolder"))
        config, state, source = ckpt.read_adapter(folder, kwargs.get("peft_config"))
        if adapter_name not in self.peft_config:
            _check_config_compatible(config)
        state = ckpt.apply_load_options(state, source, config, torch_device, key_mapping, ephemeral_gpu_offload)
        undo = ckpt.Undo(self, config, self.peft_config)
        ignore = bool(kwargs.get("ignore_mismatched_sizes", False))
        try:
            if adapter_name in self.peft_config:
                ckpt.load_state(self.base_model, adapter_name, state, source, ignore)
            else:
                config.inference_mode = not is_trainable
                init = ignore and not low_cpu_mem_usage  # ignored tensors keep their init values
                self.base_model.inject(config, adapter_name, init=init, meta=not init)
                self._note_modules_to_save(config)
                ckpt.load_state(self.base_model, adapter_name, state, source, ignore)
                if is_trainable:  # as peft: its parameters train, active or not (set_requires_grad)
                    self.base_model.mark_trainable(extra=[adapter_name])
            self.set_adapter(self.active_adapters)
        except BaseException:
            undo.restore()
            raise
        return ckpt.LoadResult([], [])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        **kwargs: Any) -> "PeftMixedModel":
        """A mixed model holding the adapter saved in ``model_id``; add others with ``load_adapter``."""
        folder = _resolve_folder(model_id, kwargs.get("subfolder"))
        if config is None:
            config, _, _ = ckpt.read_adapter(folder)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        if str(config.peft_type) not in COMPATIBLE_TUNER_TYPES:
            raise ValueError(f"Adapter of type {config.peft_type} is not supported for mixed models.")
        config.inference_mode = not is_trainable
        undo = ckpt.Undo(model, config)
        try:
            mixed = cls(model, config, adapter_name)
            mixed.load_adapter(folder, adapter_name, is_trainable=is_trainable,
                               **{k: v for k, v in kwargs.items() if k != "subfolder"})
        except BaseException:
            undo.restore()
            raise
        return mixed
