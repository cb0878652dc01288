"""Attaching adapters to a model: the generic tuner every weight-delta method shares.

``TunerModel`` holds the user's model at ``.model`` (so parameter paths read
``base_model.model.<module path>`` from the PeftModel, as in Hugging Face PEFT), injects one
``AdapterLayer`` per targeted module, wraps ``modules_to_save`` in trainable copies, and undoes all of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from .config import PeftConfig
from . import auxiliary, mha, routing
from .layers import Adapter, AdapterLayer, SharedState, adapter_layers
from .registry import get_method
from .targeting import Conv1D

from .adapter_names import BASE, NAME_RULE, check_adapter_name  # noqa: F401 - re-exported
from .saved_modules import TASK_HEADS, ModulesToSaveWrapper, select_saved, select_tied  # noqa: F401 - re-exported


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class TunerModel(nn.Module):
    """The user's model plus the machinery that attaches, activates and removes adapters."""

    # the wrapper a targeted module gets unless its method brings its own (``Adapter.layer_cls``); the mixed
    # model's tuner (mixed_model.py) uses one that nests adapters of different types, as peft's mixed model
    wrapper_cls: type[AdapterLayer] = AdapterLayer

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = []
        # adapter name -> tensors its layers share (methods with ``uses_shared_state``, e.g. VeRA): one copy
        self.shared_state = nn.ModuleDict()
        self.hook_state: dict[str, Any] = {}  # adapter name -> state its method's on_step keeps between steps
        self.hooked_methods: set[type] = set()  # adapter classes whose install_model_hooks ran (unload undoes them)

    @classmethod
    def over(cls, model: nn.Module) -> "TunerModel":
        """A tuner for a model whose adapters were injected in place (``inject_adapter_in_model``, diffusers'
        and transformers' ``add_adapter``): its configs are the model's ``peft_config`` dict, shared, and the
        active adapters those of its layers. Holding the tuner changes nothing in the model."""
        tuner = cls(model)
        configs = getattr(model, "peft_config", None)
        if not isinstance(configs, dict):
            configs = {}
            model.peft_config = configs
        tuner.peft_config = configs
        layers = [layer for _, layer in tuner.adapter_layers()]
        active = next((list(layer.active_adapters) for layer in layers if layer.active_adapters), [])
        tuner.active_adapters = [n for n in active if n in configs]
        return tuner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        loss = getattr(out, "loss", None)
        if isinstance(loss, torch.Tensor):  # methods may add a term to the loss (AdaLoRA's orthogonality penalty)
            extra = self.extra_loss()
            if extra is not None:
                out.loss = loss + extra
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- training-loop hooks (``Adapter.on_step`` / ``Adapter.extra_loss``) ------------------------------
    def _trainable_methods(self) -> list[tuple[str, type[Adapter]]]:
        """(name, adapter class) of the active adapters that train."""
        return [(n, get_method(self.peft_config[n]).adapter_cls) for n in self.active_adapters
                if not self.peft_config[n].inference_mode]

    def on_step(self, global_step: int) -> None:
        """Per-step hook of the training loop: call after ``loss.backward()``, before ``optimizer.zero_grad()``."""
        for name, cls in self._trainable_methods():
            cls.on_step(self, name, global_step)

    update_and_allocate = on_step  # Hugging Face PEFT's name for it (AdaLoRA)

    def extra_loss(self) -> torch.Tensor | None:
        """The sum of the trainable adapters' loss terms (None when no method adds one)."""
        total = None
        for name, cls in self._trainable_methods():
            term = cls.extra_loss(self, name)
            if term is not None:
                total = term if total is None else total + term
        return total

    # -- discovery -------------------------------------------------------------------------------------
    def candidates(self) -> list[tuple[str, nn.Module]]:
        """(path, base module) pairs a config may target: wrappers' internals are hidden, wrappers unwrapped."""
        out: list[tuple[str, nn.Module]] = []
        skip: tuple[str, ...] = ()
        for name, module in self.model.named_modules():
            if skip and name.startswith(skip):
                continue
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                skip = skip + (name + ".",)
                if isinstance(module, AdapterLayer):
                    out.append((name, module.base_layer))
                continue
            out.append((name, module))
        return out

    def adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        return adapter_layers(self.model)

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def adapters(self, adapter_name: str | None = None) -> Iterator[tuple[str, Adapter]]:
        """(layer path, adapter) for every adapter, or only those named ``adapter_name``."""
        for path, layer in self.adapter_layers():
            for name, adapter in layer.adapters.items():
                if adapter_name is None or name == adapter_name:
                    yield path, adapter

    # -- injection -------------------------------------------------------------------------------------
    def inject(self, config: PeftConfig, adapter_name: str, init: bool = True, meta: bool = False) -> None:
        """Attach adapter ``adapter_name`` to every module ``config`` targets.

        ``meta`` (loading): each layer's adapter is built on the meta device, so nothing is allocated until
        ``checkpoint.load_state`` gives its parameters the loaded tensors; an adapter holding a tensor that
        the file does not carry (rebuilt from its config) is built on the base layer's device instead.

        ``adapter_name`` is checked first (``check_adapter_name``): a bad name changes nothing."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete it first")
        spec = get_method(config)
        cls = spec.adapter_cls
        self._check_new_adapter(cls, config, adapter_name)
        cls.prepare_model(self.model, config)  # structural changes first (LoRA's layer_replication)
        named = self.candidates()
        cls.prepare_config(self.model, named, config)  # architecture-dependent defaults (e.g. (IA)3's FFN names)
        # before targeting: a task head is saved in full, never a target
        if getattr(config, "task_type", None) in TASK_HEADS and hasattr(config, "modules_to_save"):
            extra = [m for m in TASK_HEADS[config.task_type] if m not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        # cls.select_targets, plus: some parents read a child's weight instead of calling it (an
        # nn.MultiheadAttention's out_proj): such targets get a wrapper whose weight is the adapted one
        # (read_by_parent), or are kept from methods that are not weight deltas (mha.py)
        paths, read_by_parent = mha.select_targets(cls, self.model, named, config, spec)
        attach_parameters = cls.plan_parameters(self.model, config, adapter_name, paths, init)  # target_parameters
        saved = select_saved(self.model, list(getattr(config, "modules_to_save", None) or []), adapter_name,
                             AdapterLayer)
        embedding, tied = select_tied(self.model, config, adapter_name, saved, AdapterLayer)  # peft's modules_to_tie
        modules = dict(named)
        wrappers = dict(self.model.named_modules(remove_duplicate=False))  # aliases too (T5's tied embeddings)
        shared, extra = None, {}
        if cls.uses_shared_state:  # adapter-level tensors, built once and handed to every layer
            others = {n: (c, self.shared_state[n].tensors()) for n, c in self.peft_config.items()
                      if type(c) is type(config) and n in self.shared_state}
            shared = SharedState(cls.build_shared([(p, modules[p]) for p in paths], config, others))
            extra = {"shared": shared}
        built = []
        for path in paths:  # build everything before touching the model
            base = modules[path] if path in modules else getattr(wrappers[path], "base_layer", wrappers[path])
            if isinstance(base, Conv1D) and not getattr(config, "fan_in_fan_out", True):
                config.fan_in_fan_out = True  # GPT-2's Conv1D stores its weight transposed
            built.append((path, base, _build(cls, base, config, path, init, meta, extra)))
        # adapters a field of this config asks for of another method (LoRA's trainable_token_indices)
        aux_built, aux_classes = auxiliary.build(self.model, named, config, cls, paths, init)
        built += aux_built
        if shared is not None:
            self.shared_state[adapter_name] = shared
        layer_cls = cls.layer_cls or self.wrapper_cls  # a method may need its own wrapper (e.g. attention)
        if attach_parameters is not None:
            attach_parameters()
        for path, base, adapter in built:
            if isinstance(wrappers[path], AdapterLayer):
                layer = wrappers[path]
            else:
                # an adapter class may bring its own wrapper for its base (LoRA's nn.MultiheadAttention)
                own = type(adapter).layer_cls or layer_cls
                layer = mha.EffectiveWeightLayer(base, path) if path in read_by_parent else own(base)
            if layer is not wrappers[path]:
                _set_submodule(self.model, path, layer)
            layer.add(adapter_name, adapter)
        for method in (cls, *aux_classes):  # layers that refer to each other are linked (tied embeddings)
            method.after_inject(self.model, adapter_name)
        for path in saved + tied:  # a module already saved by another adapter gets one more copy (as PEFT)
            wrapper = self.model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                _set_submodule(self.model, path, wrapper)
            wrapper.add(adapter_name, tied_to=self.model.get_submodule(embedding) if path in tied else None)
        cls.install_model_hooks(self.model)  # methods acting on the whole call (prompts rewrite its inputs)
        self.hooked_methods.add(cls)
        self.peft_config[adapter_name] = config
        if not self.active_adapters:
            self.set_adapter(adapter_name)
        else:
            self.mark_trainable()

    def _check_new_adapter(self, cls: type, config: PeftConfig, adapter_name: str) -> None:
        """PEFT's ``_check_new_adapter_config``, before anything changes: one adapter may train biases, and a
        method may add its own rule (``check_new_adapter``: AdaLoRA trains one adapter at a time)."""
        if getattr(config, "bias", "none") != "none":
            biased = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
            if biased:
                raise ValueError(f"bias: adapter {adapter_name!r} has bias={config.bias!r} but adapter {biased[0]!r} "
                                 f"already trains biases (bias={self.peft_config[biased[0]].bias!r}); only one "
                                 "adapter may have bias != 'none' (as PEFT): set bias='none' for the others")
        cls.check_new_adapter(self.peft_config, config, adapter_name)

    def delete(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with none go back to their plain base module."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        merged = [path for path, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[0]} ({len(merged)} layers); "
                             "unmerge it (unmerge_adapter) before deleting it")
        for path, layer in reversed(self.adapter_layers()):  # a wrapper inside another's base first
            if adapter_name in layer.adapters:
                layer.remove(adapter_name)
            if not len(layer.adapters):
                _set_submodule(self.model, path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
            if not len(wrapper.modules_to_save):
                _set_submodule(self.model, path, wrapper.original_module)
        if adapter_name in self.shared_state:
            del self.shared_state[adapter_name]
        self.hook_state.pop(adapter_name, None)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.set_adapter(remaining)

    # -- activation ------------------------------------------------------------------------------------
    def set_adapter(self, names: str | list[str], inference_mode: bool | None = None) -> None:
        """Activate adapters; ``inference_mode`` (when given) freezes (True) or unfreezes (False) them."""
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; adapters: {sorted(self.peft_config)}")
        for path, wrapper in self.saved_modules():
            wrapper.check_single(path, names)
        if inference_mode is not None:
            for name in names:
                self.peft_config[name].inference_mode = inference_mode
        self.active_adapters = names
        for _, layer in self.adapter_layers():
            layer.set_active(names)
        for _, wrapper in self.saved_modules():
            wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
        self.mark_trainable()

    @contextlib.contextmanager
    def route(self, adapter_names: list[str]) -> Iterator[None]:
        """Within the block, batch row i uses adapter ``adapter_names[i]`` ("__base__": no adapter), for calls made
        in this thread only: concurrent calls from other threads keep their own routing. The block must not
        ``await`` (the thread's other asyncio tasks would see its routing)."""
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)}")
        layers = [layer for _, layer in self.adapter_layers()]
        if any(layer.merged_adapters for layer in layers):
            raise ValueError("adapter_names: cannot route a mixed batch while adapters are merged; unmerge first")
        # per call: only this thread sees the names (other threads may be calling the same model)
        with routing.routed(layers, adapter_names):
            yield

    @property
    def active_adapter(self) -> list[str]:
        """peft's tuner attribute: the list of active adapters (``PeftModel.active_adapter`` is the name)."""
        return list(self.active_adapters)

    def disable_adapter_layers(self) -> None:
        """Every adapter off, in place, until ``enable_adapter_layers`` (peft's tuner methods)."""
        self.set_disabled(True)

    def enable_adapter_layers(self) -> None:
        self.set_disabled(False)

    def set_disabled(self, disabled: bool) -> None:
        for _, layer in self.adapter_layers():
            layer.disable_adapters = disabled
        for _, wrapper in self.saved_modules():
            wrapper.disable_adapters = disabled

    def mark_trainable(self, extra: Iterable[str] = ()) -> None:
        """Only the active adapters and ``extra`` (and their saved modules / biases) train, unless in inference mode."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        train = {n for n in [*self.active_adapters, *extra] if not self.peft_config[n].inference_mode}
        for _, layer in self.adapter_layers():
            for name, adapter in layer.adapters.items():
                adapter.requires_grad_(name in train)
        for _, wrapper in self.saved_modules():
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(name in train)
        for name in train:
            for p in self.bias_parameters(name).values():
                p.requires_grad_(True)

    def bias_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Base biases that train with this adapter (``bias="all"`` / ``"<method>_only"``), by path."""
        mode = getattr(self.peft_config[adapter_name], "bias", "none")
        if mode == "all":
            # every bias of the model, except inside adapters and modules_to_save (saved in full anyway)
            excluded = tuple(f"{p}." for p, _ in self.saved_modules())
            return {
                n: p for n, p in self.model.named_parameters()
                if (n == "bias" or n.endswith(".bias")) and not n.startswith(excluded) and ".adapters." not in n
            }
        if mode.endswith("_only"):  # "lora_only", "fourier_only": the biases of the targeted layers
            return {
                f"{path}.base_layer.bias": layer.base_layer.bias
                for path, layer in self.adapter_layers()
                if adapter_name in layer.adapters and getattr(layer.base_layer, "bias", None) is not None
            }
        return {}

    # -- merge / unload --------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        layers = self.adapter_layers()
        for _, layer in layers:  # every refusal (Adapter.check_merge) before any layer changes
            layer.check_merge(adapter_names)
        for _, layer in layers:
            layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    @torch.no_grad()
    def unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Put every base module back (merged first if asked) and return the plain model."""
        methods = self.hooked_methods | {type(a) for _, layer in self.adapter_layers() for a in layer.adapters.values()}
        for _, layer in self.adapter_layers() if merge else ():  # refusals before anything changes
            layer.check_merge(adapter_names)
        for path, layer in reversed(self.adapter_layers()):  # a wrapper inside another's base first
            if merge:
                layer.merge(adapter_names, safe_merge=safe_merge)
            _set_submodule(self.model, path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            # the active trained copy replaces the original, as in Hugging Face PEFT
            active = wrapper.active_adapter
            _set_submodule(self.model, path, wrapper.modules_to_save[active] if active else wrapper.original_module)
        for cls in methods:
            cls.remove_model_hooks(self.model)
        self.hooked_methods.clear()
        self.peft_config.clear()
        self.shared_state.clear()
        self.hook_state.clear()
        self.active_adapters = []
        return self.model


class _OnMeta(TorchFunctionMode):
    """Tensor constructors make meta tensors, even those given the base weight's device explicitly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _device_constructors():
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build(cls: type, base: nn.Module, config: PeftConfig, path: str, init: bool, meta: bool,
           extra: dict[str, Any]) -> nn.Module:
    """One layer's adapter; with ``meta`` on the meta device when every tensor it holds comes from the file."""
    if meta and not init and not cls.names_file_keys():
        try:
            with _OnMeta():
                adapter = cls(base, config, path, init=False, **extra)
        except (NotImplementedError, RuntimeError):  # a constructor that reads data (AdaLoRA's rank state)
            return cls(base, config, path, init=init, **extra)
        from_file = {id(getattr(adapter, name)) for name in adapter.checkpoint_keys if hasattr(adapter, name)}
        held = [t for t in (*adapter.parameters(), *adapter.buffers()) if t.is_meta]
        if all(id(t) in from_file for t in held):
            ref = next(base.parameters(), None)
            adapter.load_device = ref.device if ref is not None and not ref.is_meta else torch.device("cpu")
            return adapter
    return cls(base, config, path, init=init, **extra)
