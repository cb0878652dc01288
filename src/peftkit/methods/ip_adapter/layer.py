"""IP-Adapter (Ye et al. 2023, arXiv 2308.06721): an image prompt for a text-to-image diffusion UNet through
decoupled cross-attention; the survey's additive category.

The image encoder (a frozen CLIP vision model) turns the prompt image into one embedding ``e`` (D,), its
``image_embeds``. A trained projection makes N tokens of the text's width c from it, ``c_i = LayerNorm(W e + b)``
(diffusers' ``ImageProjection``: ``W`` (N c, D)), and every cross-attention of the UNet gets its own image keys and
values beside the text's:

    Z = Attention(Q, K_t, V_t) + lambda Attention(Q, K_i, V_i),    K_i = c_i W'_k,  V_i = c_i W'_v

(the paper's Eq. 5) with ``W'_k`` / ``W'_v`` (``to_k_ip`` / ``to_v_ip``, bias-free Linear(c, d) as the layer's
``to_k`` / ``to_v``) initialised from ``W_k`` / ``W_v``. Trained: the projection (``D N c + N c + 2 c``, once) and
``to_k_ip`` / ``to_v_ip`` (``2 c d`` per cross-attention); the UNet, the text encoder and the image encoder stay
frozen. ``lambda`` is ``IPAdapterConfig.scale`` (``set_ip_adapter_scale`` changes it).

diffusers does the work: each cross-attention runs diffusers' ``IPAdapterAttnProcessor2_0`` (the adapter holds one,
with its ``to_k_ip`` / ``to_v_ip``) on the base ``Attention``, and the projection is an ``ImageProjection`` inside a
``MultiIPAdapterImageProjection`` (one per adapter, shared by all its layers: the same module in each). The
wrapper (``wrapper.py``) runs the base module unchanged when an adapter has nothing to add.

The image prompt comes with the call: ``model(sample, t, encoder_hidden_states=text, ip_adapter_image_embeds=e)``
with ``e`` of shape ``(B, D)`` or ``(B, N_images, D)`` (one tensor for every active IP-Adapter, a list in the active
adapters' order, or a dict by adapter name), or diffusers' ``added_cond_kwargs={"image_embeds": [e]}`` when the
base UNet has no image projection of its own. Without an image prompt, with ``scale`` 0 or with the adapters
disabled the output is the base model's.

Files: peftkit's adapter file holds ``base_model.model.<attn2 path>.to_{k,v}_ip.weight`` per layer and
``base_model.image_proj.{image_embeds,norm}.{weight,bias}`` once (peft has no IP-Adapter). ``save_ip_adapter``
(``files.py``) writes diffusers' IP-Adapter file instead, which ``StableDiffusionPipeline.load_ip_adapter`` and
``UNet2DConditionModel._load_ip_adapter_weights`` load (``num_tokens`` 4, every cross-attention targeted);
``load_ip_adapter_file`` reads one into a peftkit model.

On SD3's transformer (``SD3Transformer2DModel``) the same method adapts every joint attention with diffusers'
``SD3IPAdapterJointAttnProcessor2_0`` and projects the image features with a timestep-conditioned
``IPAdapterTimeImageProjection``, as diffusers' SD3 IP-Adapter: ``sd3.py``.

Not mergeable (the image branch is an extra attention, not a weight delta); per-row routing (``adapter_names``) is
refused: rows differ by their image prompts instead. The adapter's tensors take the base layer's dtype.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...layers import Adapter, adapter_layers
from ...registry import register_method
from ...targeting import NotApplicableError, TargetError, is_target
from . import functional as IF
from . import sd3
from .config import IPAdapterConfig
from .wrapper import PROMPT_KEY, IPAdapterLayer, image_prompt_scope, project_prompts

MERGE_ERROR = ("IP-Adapter cannot be merged into the base model: its image branch is an extra attention over image "
               "tokens, not a weight delta")
OWNER = "IPAdapterConfig"


def is_cross_attention(module: nn.Module) -> bool:
    """A diffusers ``Attention`` that attends to encoder states (a UNet's ``attn2``) through to_k / to_v Linears."""
    return (type(module).__name__ == "Attention" and type(module).__module__.startswith("diffusers")
            and bool(getattr(module, "is_cross_attention", False))
            and isinstance(getattr(module, "to_k", None), nn.Linear) and isinstance(getattr(module, "to_v", None), nn.Linear))


def _kv(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The layer's to_k / to_v, under any adapter wrapper (LoRA on to_k leaves its base_layer the Linear)."""
    return tuple(getattr(getattr(module, n), "base_layer", getattr(module, n)) for n in ("to_k", "to_v"))


def cross_attentions(model: nn.Module, named: list[tuple[str, nn.Module]], config: IPAdapterConfig) -> list[str]:
    """Paths of the cross-attention modules (SD3: joint attentions) ``config`` selects; NotApplicableError when the
    model has none."""
    found = sd3.joint_attentions(named)
    what = "joint attention modules (SD3)" if found else "cross-attention modules"
    found = found or [p for p, m in named if p and is_cross_attention(m)]
    if not found:
        raise NotApplicableError(f"IP-Adapter on {type(model).__name__}: no diffusers cross-attention (an Attention "
                                 "with is_cross_attention, e.g. a UNet2DConditionModel's attn2) and no SD3 joint "
                                 "attention (JointAttnProcessor2_0)")
    targets = config.target_modules
    if targets is None:
        return found
    picked = [p for p, m in named if p and is_target(config, p, targets)]
    bad = [p for p in picked if p not in found]
    if bad or not picked:
        raise TargetError(f"{OWNER}.target_modules: {sorted(targets) if isinstance(targets, set) else targets!r} "
                          f"selects {bad[:1] or 'nothing'}; expected {what}, among {found}")
    return picked


@register_method(
    "ip_adapter",
    config=IPAdapterConfig,
    category="additive",
    modalities=("generation",),
    mergeable=False,
    param_formula="D N c + N c + 2 c (image projection, once) + 2 c d per cross-attention (to_k_ip, to_v_ip)",
    position="image keys and values beside each cross-attention's text ones, from a projected image embedding",
    starts_at_base=False,
    paper="arXiv 2308.06721 (Ye et al. 2023), IP-Adapter",
    examples={"ip_adapter": {"image_embed_dim": 32, "resampler_dim": 16, "resampler_heads": 1, "timestep_in_dim": 8}},
)
class IPAdapterAdapter(Adapter):
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)
    default_roles: ClassVar[tuple[str, ...]] = ()
    supports_routing: ClassVar[bool] = False
    layer_cls: ClassVar[type | None] = IPAdapterLayer

    # -- targets ---------------------------------------------------------------------------------------------
    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: IPAdapterConfig) -> list[str]:
        paths = cross_attentions(model, named, config)
        modules = dict(named)
        if sd3.is_joint_attention(modules[paths[0]]):  # SD3: every joint attention runs JointAttnProcessor2_0
            return paths
        widths = {_kv(modules[p])[0].in_features for p in paths}
        if len(widths) > 1:
            raise TargetError(f"{OWNER}.target_modules: the selected cross-attentions read text of different widths "
                              f"{sorted(widths)}; one image projection needs one width")
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        odd = [p for p in paths if not isinstance(modules[p].processor, (AttnProcessor, AttnProcessor2_0))]
        if odd:
            raise TargetError(f"IP-Adapter on {odd[0]!r}: its attention processor is "
                              f"{type(modules[odd[0]].processor).__name__}; expected diffusers' default "
                              "AttnProcessor2_0 (IP-Adapter runs IPAdapterAttnProcessor2_0 in its place)")
        return paths

    @classmethod
    def param_count(cls, base: nn.Module, config: IPAdapterConfig, key: str = "") -> int:
        """to_k_ip and to_v_ip: ``2 c d`` (c: the text width, d: the attention width); SD3: ``sd3.py``."""
        if sd3.is_joint_attention(base):
            return sd3.processor_param_count(base, config)
        to_k, to_v = _kv(base)
        return to_k.in_features * to_k.out_features + to_v.in_features * to_v.out_features

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: IPAdapterConfig) -> int:
        """The image projection, once per adapter: ``D N c + N c`` (Linear) ``+ 2 c`` (LayerNorm); SD3's resampler:
        ``sd3.projection_param_count``."""
        if sd3.is_joint_attention(targets[0][1]):
            return sd3.projection_param_count(sd3.widths(targets[0][1])[0], config)
        c = _kv(targets[0][1])[0].in_features
        n = config.num_tokens
        return config.image_embed_dim * n * c + n * c + 2 * c

    # -- the adapter -------------------------------------------------------------------------------------------
    def __init__(self, base: nn.Module, config: IPAdapterConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        self.__dict__["config"] = config
        self.key = key
        to_k, to_v = _kv(base)
        if to_v.out_features != to_k.out_features or to_v.in_features != to_k.in_features:
            raise TargetError(f"IP-Adapter on {key!r}: to_k {tuple(to_k.weight.shape)} and to_v "
                              f"{tuple(to_v.weight.shape)} differ; expected the same shape")
        self.num_tokens = config.num_tokens
        self.scale = float(config.scale)
        self.joint = sd3.is_joint_attention(base)  # SD3's joint attention (sd3.py)
        self.image_proj: nn.Module | None = None  # the adapter's one projection, linked by after_inject
        if self.joint:
            self.processor = sd3.build_processor(base, config, init)
            return
        ref = to_k.weight
        self.processor = IPAdapterAttnProcessor2_0(hidden_size=to_k.out_features, cross_attention_dim=to_k.in_features,
                                                   num_tokens=(self.num_tokens,), scale=self.scale)
        self.processor.to(device=ref.device, dtype=ref.dtype)
        if init and config.init_weights:  # the paper: W'_k, W'_v start as W_k, W_v
            with torch.no_grad():
                self.processor.to_k_ip[0].weight.copy_(to_k.weight)
                self.processor.to_v_ip[0].weight.copy_(to_v.weight)

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)
        self.processor.scale = self.scale if self.joint else [self.scale]

    def build_projection(self) -> nn.Module:
        """A new image projection (diffusers' ImageProjection in a MultiIPAdapterImageProjection), on this layer's
        device and dtype, with diffusers' (PyTorch's) initialisation; SD3: an IPAdapterTimeImageProjection."""
        if self.joint:
            w = self.processor.to_k_ip.weight
            return sd3.build_projection(w.shape[1], self.config, w.device, w.dtype)
        from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

        w = self.processor.to_k_ip[0].weight
        proj = ImageProjection(image_embed_dim=self.config.image_embed_dim, cross_attention_dim=w.shape[1],
                               num_image_text_embeds=self.num_tokens)
        return MultiIPAdapterImageProjection([proj]).to(device=w.device, dtype=w.dtype)

    @property
    def projection(self) -> nn.Module:
        """The ImageProjection (SD3: the IPAdapterTimeImageProjection) itself."""
        if self.image_proj is None:
            raise RuntimeError("IP-Adapter: this layer's adapter has no image projection (add IP-Adapter adapters "
                               "through get_peft_model / add_adapter / load_adapter, which link it)")
        return self.image_proj if self.joint else self.image_proj.image_projection_layers[0]

    def project(self, embeds: Tensor, timestep: Tensor | None = None) -> Any:
        """Image tokens (B, N_images, num_tokens, c) of image embeddings (B, N_images, D); SD3: the resampler's
        (tokens (B, num_tokens, d), timestep embedding (B, resampler_dim)) of image features (B, L, D)."""
        projection = self.projection
        if self.joint:
            return projection(embeds, timestep)
        return self.image_proj([embeds])[0]

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """One image projection per adapter, built on its first layer and held by every layer (the same module)."""
        adapters = [layer.adapters[adapter_name] for _, layer in adapter_layers(model)
                    if isinstance(layer, IPAdapterLayer) and adapter_name in layer.adapters]
        if not adapters:
            return
        proj = adapters[0].build_projection()
        for adapter in adapters:
            adapter.image_proj = proj

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # the wrapper runs the attention
        return out

    # -- the file ----------------------------------------------------------------------------------------------
    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        if self.joint:  # SD3: every tensor of the processor, under its own name
            out = {f"base_model.model.{self.key}.{n}": t for n, t in self.processor.named_parameters()}
        else:
            out = {f"base_model.model.{self.key}.to_k_ip.weight": self.processor.to_k_ip[0].weight,
                   f"base_model.model.{self.key}.to_v_ip.weight": self.processor.to_v_ip[0].weight}
        for name, t in self.projection.named_parameters():  # every layer names the one projection: one entry
            out[f"base_model.image_proj.{name}"] = t
        return out

    # -- merging: refused ---------------------------------------------------------------------------------------
    merge_refusal: ClassVar[str | None] = MERGE_ERROR

    # -- the call's image prompt ---------------------------------------------------------------------------------
    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> Any:
        """Take ``ip_adapter_image_embeds`` out of the call (or read diffusers' ``added_cond_kwargs["image_embeds"]``
        when the base UNet has no image projection of its own; SD3: diffusers' ``joint_attention_kwargs``), check it
        against the active IP-Adapter adapters and the batch, project it, and pass the image tokens on in the call's
        ``cross_attention_kwargs`` (SD3: ``joint_attention_kwargs``) under ``ip_hidden_states`` (``wrapper.py``); a base
        whose forward takes neither reads them from a scope held for the call."""
        embeds = call["kwargs"].pop(IF.ARG, None)
        if embeds is None:
            embeds = sd3.pop_joint_embeds(model, call["kwargs"])
        if embeds is None:
            embeds = _diffusers_image_embeds(model, call["kwargs"])
        if embeds is None:
            return None
        configs = model.peft_config
        names = [n for n in model.active_adapters if isinstance(configs.get(n), IPAdapterConfig)]
        if not names:
            return None
        args = _call_arguments(model, call)
        sample = args.get("sample", args.get("hidden_states"))
        rows = sample.shape[0] if isinstance(sample, Tensor) and sample.dim() == 4 else None
        joint = "joint_attention_kwargs" in args  # SD3's transformer: image features (B, L, D), one IP-Adapter
        checked = {n: IF.check_image_embeds(e, configs[n].image_embed_dim, rows, f"IP-Adapter adapter {n!r}",
                                            middle="tokens" if joint else "images")
                   for n, e in IF.per_adapter(embeds, names).items()}
        timestep = args.get("timestep")
        if joint:
            sd3.check_call(sorted(checked), timestep)
        carrier = _attention_kwargs(model, call, args, "joint_attention_kwargs" if joint else "cross_attention_kwargs")
        if carrier is None:  # the base's forward cannot carry the tokens: a scope for the call, no checkpointing
            _refuse_checkpointing(model)
            return image_prompt_scope(checked, timestep)
        given = call["kwargs"].get(carrier)
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"{carrier}: expected a dict or None, got {type(given).__name__}")
        # projected once, here; the tokens then go with the blocks' arguments (a checkpointed block's recomputation
        # in backward sees them too)
        call["kwargs"][carrier] = {**(given or {}), PROMPT_KEY: project_prompts(model, checked, timestep)}
        return None


def _attention_kwargs(model: Any, call: dict[str, Any], args: dict[str, Any], name: str) -> str | None:
    """``name`` when the base model's forward takes it as a keyword the call did not give positionally (diffusers
    passes it on to every attention), else None."""
    if name not in args:
        return None
    try:
        positional = list(inspect.signature(model.get_base_model().forward).parameters)[:len(call["args"])]
    except (TypeError, ValueError):
        positional = []
    return None if name in positional else name


def _refuse_checkpointing(model: Any) -> None:
    """ValueError when gradient checkpointing is on (and gradients recorded): its recomputation in backward runs after
    the call's image prompt scope has ended, so the recomputed attention would miss the image branch."""
    base = model.get_base_model()
    if not torch.is_grad_enabled() or not any(getattr(m, "gradient_checkpointing", False) is True
                                              for m in base.modules()):
        return
    raise ValueError(f"IP-Adapter with gradient checkpointing: {type(base).__name__}.forward takes no "
                     "cross_attention_kwargs (or it was given positionally), which carry the image tokens into the "
                     "checkpointed blocks; pass cross_attention_kwargs by keyword, use a base model whose forward "
                     "takes it (UNet2DConditionModel, SD3Transformer2DModel), or turn gradient checkpointing off "
                     "(disable_gradient_checkpointing())")


def _diffusers_image_embeds(model: Any, kwargs: dict[str, Any]) -> Any:
    """diffusers' ``added_cond_kwargs["image_embeds"]`` (a list with one entry, or a tensor), when the base UNet
    does not read it itself (no ``encoder_hid_proj``); left in place for the base, which ignores it then."""
    added = kwargs.get("added_cond_kwargs")
    if not isinstance(added, dict) or added.get("image_embeds") is None:
        return None
    base = model.get_base_model()
    if getattr(base, "encoder_hid_proj", None) is not None:
        return None
    value = added["image_embeds"]
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def _call_arguments(model: Any, call: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones named by the base model's forward), and every parameter name
    of that forward (None when the call leaves it out)."""
    try:
        params = list(inspect.signature(model.get_base_model().forward).parameters)
    except (TypeError, ValueError):
        params = []
    out: dict[str, Any] = dict.fromkeys(p for p in params if p not in ("args", "kwargs"))
    out.update(zip(params, call["args"]))
    out.update(call["kwargs"])
    return out


def set_ip_adapter_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> None:
    """Set lambda, the image branch's weight, of IP-Adapter ``adapter_name`` (None: every IP-Adapter adapter) on
    every layer and in its config (so a save records it); 0 gives the base model."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"set_ip_adapter_scale: expected a finite number, got {scale!r}")
    configs = model.peft_config
    names = [n for n, c in configs.items() if isinstance(c, IPAdapterConfig)]
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"set_ip_adapter_scale: no IP-Adapter adapter {adapter_name!r} (IP-Adapter adapters: "
                             f"{names})")
        names = [adapter_name]
    for _, layer in adapter_layers(model):
        for name in names:
            if isinstance(layer, IPAdapterLayer) and name in layer.adapters:
                layer.adapters[name].set_scale(scale)
    for name in names:
        configs[name].scale = float(scale)
