"""Side networks beside a frozen diffusers ``UNet2DConditionModel`` (ControlNet, T2I-Adapter) or
``SD3Transformer2DModel`` (ControlNet), driven by a conditioning image: what the methods share.

Hosting. The side network (a diffusers ``ControlNetModel`` / ``SD3ControlNetModel`` / ``T2IAdapter``) lives in an
``Adapter`` hosted, for bookkeeping only, on the wrapper of the UNet's ``conv_out`` or the SD3 transformer's
``proj_out`` (layers the side networks copy nothing from, ``BACKBONES``); it never changes that layer's output
(``changes_output = False``). So naming, activation, ``disable_adapter``, trainability, save / load, delete and the
contract suite work unchanged.

The call. The conditioning image comes with the ``PeftModel`` call as a keyword argument (``controlnet_cond=`` /
``adapter_cond=``, ``SideNetAdapter.cond_argument``). ``call_context`` takes it out of the call, checks it against
every active adapter of the method (a float tensor of shape ``(batch, conditioning channels, H f, W f)`` for a
sample ``(batch, C, H, W)``: the UNet's ``sample``, the transformer's ``hidden_states``; ``f`` the adapter's downscale
factor) before anything runs, and holds it for the call in a thread-local (never on the layers, which request threads
share). One forward pre-hook on the UNet / transformer (installed by ``install_model_hooks``) then runs each active
side network on the call's own inputs and adds its output to the model's residual arguments
(``down_block_additional_residuals`` / ``mid_block_additional_residual`` for ControlNet on a UNet,
``down_intrablock_additional_residuals`` for T2I-Adapter, ``block_controlnet_hidden_states`` for ControlNet on
SD3); residuals already in the call (another side network, the caller's own) are summed with them, as diffusers'
``MultiControlNetModel`` does. Adapters disabled or none active: the argument is dropped and the model runs as it is.

No conditioning image: an adapter whose config sets ``blank_condition`` uses a constant image of that value (an
"empty" control, as for unconditional samples); otherwise the call raises, naming the argument and the shape.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import threading
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...layers import Adapter, AdapterLayer
from ...saved_modules import ModulesToSaveWrapper
from ...targeting import NotApplicableError

HOST = "conv_out"  # the UNet layer whose wrapper holds the side networks (from_unet copies nothing from it)
# diffusers backbone class -> (the layer whose wrapper holds the side networks, the call's sample argument)
BACKBONES = {"UNet2DConditionModel": (HOST, "sample"), "SD3Transformer2DModel": ("proj_out", "hidden_states")}
_UNSET = object()


class _Local(threading.local):
    def __init__(self) -> None:
        self.conds: dict[str, Any] = {}  # argument name -> this thread's call's conditioning image (or None)


_LOCAL = _Local()


def is_unet(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers ``UNet2DConditionModel`` (diffusers not imported: it cannot be one)."""
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(model, diffusers.UNet2DConditionModel)


def backbone_of(model: nn.Module) -> str | None:
    """The ``BACKBONES`` class ``model`` is an instance of (None: none of them, or diffusers not imported)."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return None
    return next((name for name in BACKBONES if isinstance(model, getattr(diffusers, name))), None)


def host_name(model: nn.Module) -> str:
    """The attribute of ``model`` whose wrapper holds its side networks."""
    return BACKBONES.get(backbone_of(model) or "", (HOST,))[0]


def sample_name(model: nn.Module) -> str:
    """The name of ``model``'s sample argument (``sample``: a UNet; ``hidden_states``: an SD3 transformer)."""
    return BACKBONES.get(backbone_of(model) or "", (HOST, "sample"))[1]


def require_unet(model: nn.Module, label: str) -> nn.Module:
    if not is_unet(model):
        raise NotApplicableError(f"{label} on {type(model).__name__}: it rides a diffusers UNet2DConditionModel "
                                 "(its down blocks take the side network's residuals)")
    return model


def plain_state(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` as it was before peftkit wrapped anything inside it: base layers under their own
    names, adapters and trained copies left out (what ``ControlNetModel.from_unet`` copies from)."""
    wrappers = [n for n, m in module.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    out = {}
    for key, value in module.state_dict().items():
        for prefix in sorted(wrappers, key=len, reverse=True):  # the innermost wrapper first
            head = f"{prefix}." if prefix else ""
            if not key.startswith(head):
                continue
            rest = key[len(head):]
            inner = next((k for k in ("base_layer.", "original_module.") if rest.startswith(k)), None)
            if inner is None:
                key = None  # an adapter's or a trained copy's tensor
                break
            key = head + rest[len(inner):]
        if key is not None:
            out[key] = value
    return out


class PlainPart:
    """A model part as ``from_unet`` / ``from_transformer`` read it (``state_dict()`` only), without peftkit's
    wrappers."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return plain_state(self.module)


def plain_unet_view(unet: nn.Module) -> Any:
    """What ``ControlNetModel.from_unet`` reads of a UNet (its config and its encoder parts' state dicts), with the
    base weights even where adapters already wrap layers of those parts."""
    parts = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block")
    view = {p: PlainPart(getattr(unet, p)) for p in parts if getattr(unet, p, None) is not None}
    if getattr(unet, "class_embedding", None) is None:
        view["class_embedding"] = None
    return SimpleNamespace(config=unet.config, **view)


def jsonable(config: Any) -> dict[str, Any]:
    """A diffusers config without its private keys, as JSON would give it back (tuples -> lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


# -- residuals (pure functions on the call's arguments) --------------------------------------------------------
def add_residuals(old: Any, new: Any) -> Any:
    """``old + new`` for a residual argument: a tensor, or a tuple / list of tensors summed element by element
    (None: ``new``)."""
    if old is None:
        return new
    if isinstance(new, Tensor):
        return old + new
    if len(old) != len(new):
        raise ValueError(f"residuals: the call already holds {len(old)} residuals, the side network gives {len(new)}")
    summed = [a + b for a, b in zip(old, new)]
    return summed if isinstance(new, list) else tuple(summed)


def bind_call(unet: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The UNet call's arguments by name (positional ones included)."""
    return dict(inspect.signature(unet.forward).bind(*args, **kwargs).arguments)


def sample_of(call: dict[str, Any], model: nn.Module) -> Tensor | None:
    """The sample tensor of a ``PeftModel`` call on ``model`` (its first argument, or its keyword)."""
    sample = call["kwargs"].get(sample_name(model), call["args"][0] if call["args"] else None)
    return sample if isinstance(sample, Tensor) else None


@contextlib.contextmanager
def cond_scope(argument: str, cond: Tensor | None) -> Iterator[None]:
    """Within the block, and only in this thread, the UNet's hook reads ``cond`` for ``argument``."""
    outer = _LOCAL.conds.get(argument, _UNSET)
    _LOCAL.conds[argument] = cond
    try:
        yield
    finally:
        if outer is _UNSET:
            del _LOCAL.conds[argument]
        else:
            _LOCAL.conds[argument] = outer


def active_side(unet: nn.Module, cls: type | None = None) -> list[tuple[str, "SideNetAdapter"]]:
    """The model's active, enabled side-network adapters (of ``cls`` when given), in activation order."""
    layer = getattr(unet, host_name(unet), None)
    if not isinstance(layer, AdapterLayer) or layer.disable_adapters:
        return []
    found = [(n, layer.adapters[n]) for n in layer.active_adapters if n in layer.adapters]
    return [(n, a) for n, a in found if isinstance(a, cls or SideNetAdapter)]


def side_hook(unet: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook on the UNet / transformer: each active side network's residuals join the call's arguments."""
    active = active_side(unet)
    if not active:
        return None
    if getattr(unet, host_name(unet)).routing is not None:
        raise ValueError(f"{active[0][1].label}: adapter_names (per-row routing of a mixed batch) is not supported; "
                         "the side network conditions the whole UNet call")
    call = bind_call(unet, args, kwargs)
    for name, adapter in active:
        cond = adapter.resolve_cond(_LOCAL.conds.get(adapter.cond_argument, None), call[sample_name(unet)], name,
                                    in_call=adapter.cond_argument in _LOCAL.conds)
        for key, value in adapter.residuals(call, cond).items():
            call[key] = add_residuals(call.get(key), value)
    return (), call


class SideNetAdapter(Adapter):
    """An adapter holding a side network of the UNet (see the module docstring). Subclasses set ``cond_argument``,
    ``label`` and ``file_prefix``, hold the network as ``self.net`` and implement ``residuals``; ``__init__`` sets
    ``cond_channels``, ``factor`` (conditioning pixels per sample pixel), ``scale`` and ``blank``. ``backbones``:
    the ``BACKBONES`` the method rides."""

    changes_output: ClassVar[bool] = False  # the host layer's output is left alone; the hook does the work
    supports_routing: ClassVar[bool] = False
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Conv2d,)
    default_roles: ClassVar[tuple[str, ...]] = ()
    cond_argument: ClassVar[str] = ""
    label: ClassVar[str] = ""
    file_prefix: ClassVar[str] = ""
    backbones: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)
    cond_channels: int
    factor: int
    scale: float
    blank: float | None

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        return [host_name(cls.require_backbone(model))]

    @classmethod
    def require_backbone(cls, model: nn.Module) -> nn.Module:
        """``model``, or ``NotApplicableError`` unless it is one of the method's ``backbones``."""
        if backbone_of(model) not in cls.backbones:
            if cls.backbones == ("UNet2DConditionModel",):
                return require_unet(model, cls.label)
            raise NotApplicableError(f"{cls.label} on {type(model).__name__}: it rides a diffusers "
                                     f"{' or '.join(cls.backbones)} (whose blocks take the side network's residuals)")
        return model

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return out

    def residuals(self, call: dict[str, Any], cond: Tensor) -> dict[str, Any]:  # pragma: no cover - abstract
        """The UNet residual arguments this network adds, from the call's arguments and the conditioning image."""
        raise NotImplementedError

    # -- the conditioning image ------------------------------------------------------------------------------
    def cond_shape(self, sample_shape: Sequence[int]) -> tuple[int, ...]:
        """The conditioning image's shape for a sample of ``sample_shape`` (batch, C, H, W)."""
        b, _, h, w = sample_shape
        return (b, self.cond_channels, h * self.factor, w * self.factor)

    def check_cond(self, cond: Any, sample: Tensor | None, name: str) -> None:
        """Raise ``ValueError`` naming the argument and the expected shape unless ``cond`` fits ``sample``."""
        arg = self.cond_argument
        if sample is None or sample.dim() != 4:
            expected = f"(batch, {self.cond_channels}, height x {self.factor}, width x {self.factor}) of the sample"
        else:
            expected = str(self.cond_shape(sample.shape))
        who = f"{self.label} adapter {name!r}"
        if cond is None:
            if self.blank is None:
                raise ValueError(f"{arg}: {who} needs a conditioning image of shape {expected}: pass "
                                 f"model(..., {arg}=image) (or set blank_condition in its config)")
            return
        if not isinstance(cond, Tensor) or not cond.is_floating_point():
            raise ValueError(f"{arg}: {who} expects a float tensor of shape {expected}, got "
                             f"{type(cond).__name__ if not isinstance(cond, Tensor) else cond.dtype}")
        if sample is not None and sample.dim() == 4 and tuple(cond.shape) != self.cond_shape(sample.shape):
            times = f" times {self.factor}" if self.factor != 1 else ""
            raise ValueError(f"{arg}: {who} expects a conditioning image of shape {expected} (batch, "
                             f"{self.cond_channels} channels, the sample's {tuple(sample.shape[2:])}{times}), got "
                             f"{tuple(cond.shape)}")

    def resolve_cond(self, cond: Tensor | None, sample: Tensor, name: str, in_call: bool = True) -> Tensor:
        """The image the network reads: ``cond`` (checked), or the blank image when none was given."""
        if cond is None and self.blank is None and not in_call:
            raise ValueError(f"{self.cond_argument}: {self.label} adapter {name!r} needs a conditioning image; call "
                             f"the PeftModel with {self.cond_argument}=image (the base model was called without one)")
        self.check_cond(cond, sample, name)
        ref = next(self.net.parameters())
        if cond is None:
            return torch.full(self.cond_shape(sample.shape), float(self.blank), device=ref.device, dtype=ref.dtype)
        return cond.to(device=ref.device, dtype=ref.dtype)

    # -- the model hooks -------------------------------------------------------------------------------------
    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> contextlib.AbstractContextManager | None:
        """Take the conditioning image out of the call and check it against the method's active adapters."""
        cond = call["kwargs"].pop(cls.cond_argument, None)
        active = active_side(model.get_base_model(), cls)
        if not active:
            return None  # adapters off (disable_adapter) or none of this method active: the image is not used
        sample = sample_of(call, model.get_base_model())
        for name, adapter in active:
            adapter.check_cond(cond, sample, name)
        return cond_scope(cls.cond_argument, cond)

    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        if side_hook not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(side_hook, with_kwargs=True)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        for key in [k for k, fn in model._forward_pre_hooks.items() if fn is side_hook]:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)

    # -- the file: the side network's own state dict (diffusers' key names) after the method's prefix -------------
    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        return {f"base_model.model.{self.file_prefix}.{k}": t for k, t in self.net.state_dict(keep_vars=True).items()}

    # -- merging: refused --------------------------------------------------------------------------------------
    def check_merge(self, base: nn.Module) -> None:
        raise NotImplementedError(f"{self.label} cannot be merged into the base model: it is a side network driven by "
                                  "a conditioning image, not a weight delta")

    def delta_weight(self, base: nn.Module) -> Tensor:
        self.check_merge(base)
        raise AssertionError("unreachable")


def to_place(net: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``net`` on ``device`` in ``dtype`` (a dtype cast only when it differs: diffusers warns on every cast)."""
    net = net.to(device)
    ref = next(net.parameters(), None)
    return net if ref is None or ref.dtype == dtype else net.to(dtype)


def side_adapter(model: Any, adapter_name: str, cls: type) -> "SideNetAdapter":
    """Adapter ``adapter_name`` of method ``cls`` on ``model`` (a ``PeftModel``, or a UNet / SD3 transformer with
    adapters injected)."""
    unet = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapters = dict(getattr(getattr(unet, host_name(unet), None), "adapters", {}))
    if not isinstance(adapters.get(adapter_name), cls):
        found = sorted(n for n, a in adapters.items() if isinstance(a, cls))
        raise KeyError(f"no {cls.label} adapter named {adapter_name!r} on this model ({cls.label} adapters: {found})")
    return adapters[adapter_name]
