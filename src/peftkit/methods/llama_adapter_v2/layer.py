"""LLaMA-Adapter V2 (Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model",
arXiv 2304.15010), on a language model alone or inside a LLaVA-style vision-language model.

Three parts, all starting at the base model exactly:

1. Bias and scale tuning ("unlocking more learnable parameters"). Every linear layer of the language model's
   blocks (attention q, k, v, o and the FFN's gate, up, down; not the output head: peftkit's reading of "each
   linear layer") gets a bias b and a scale s, per output channel:

       y = s ⊙ (W x + b0 + b),        b = 0, s = 1 at the start,

   which merges into the layer: W' = diag(s) W, b0' = s ⊙ (b0 + b) (a bias-free layer gets one for the merge;
   unmerge restores W and b0 bit for bit). The paper also unfreezes every normalization layer; peftkit trains
   it as the same re-parameterization, y = s ⊙ (norm(x) + b) (b only where the norm has a bias: an RMSNorm
   gets s alone), merging into the norm's own weight and bias (``tune_norms``; s = 1, b = 0 at the start).

2. Adaption prompts with zero-init gated attention (as LLaMA-Adapter V1, ``methods.prompt.adaption_prompt``,
   whose attention wrapper this reuses). In a prompted layer l with K learned prompts P_l (K x d), per head h,
   with the layer's own rotary-embedded queries q_h:

       head_h = Attn_h(x) + g_l softmax(q_h (W_k P'_l)_h^T / sqrt(d_h)) (W_v P'_l)_h,      out = W_o concat_h head_h

   the prompt term joins the heads' outputs before W_o, its softmax over the K prompts alone, g_l a scalar gate
   initialised to 0. W_k, W_v (and W_o) are the layer's projections with their bias / scale (the official code
   projects the prompts through the same tuned layers). peftkit's choice: V1's scalar, un-squashed gate; the
   official V2 code gates each head with tanh(g_{l,h}), which also starts at 0.

3. Early fusion of visual knowledge. The visual prompt v is the call's projected image features (the output
   of LLaVA's ``multi_modal_projector``; the vision tower stays frozen), averaged over the patches:
   v = mean_p F_p (one d-vector per image; peftkit's choice: the paper's global visual feature, as V1's
   I_p, without a learned visual-query network). It is added to every prompt token of the first V layers only,

       P'_l = P_l + 1_K v^T  for l < V,        P'_l = P_l  for the top L layers (text only),

   so image and language-instruction knowledge live in disjoint layers (V + L <= the number of layers;
   peftkit's choice: the early layers have learned prompts P_l of their own, to which v is added, as V1's
   multi-modal prompts). A call without an image (no ``pixel_values``) has v = 0 in every layer. One image
   per batch row. On LLaVA the image still enters as tokens, as the base model's; the fusion adds to it.

Trainable parameters: 2 d_out per linear layer, d (2 d with a bias) per norm, K d + 1 per prompted layer
(V + L layers). The adaption prompts do not merge (``merge_adapter`` refuses and says so);
``merge_bias_scale(model)`` folds the bias / scale part into the weights and ``unmerge_adapter`` undoes it.
File keys: ``<linear or norm>.adapter_scale`` / ``.adapter_bias``, ``<attention>.adaption_prompt`` /
``.adaption_gate`` (V1's), each module named by its path in the plain model (no ``base_layer``). In a mixed
batch (``adapter_names``) each adapter's prompts go through its own bias / scale. Supported: Llama and Mistral
attention (also as a LLaVA language model), GPT-2 (V1's convention there: the prompt term is added after the
output projection, not through it, so without its bias / scale).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ... import routing
from ...layers import Adapter, AdapterLayer, adapter_layers
from ...registry import register_method
from ..prompt.adaption_prompt import AdaptionPromptAdapter
from . import functional as fn
from . import visual as vis
from .config import LlamaAdapterV2Config
from .targets import LINEAR_TYPES, find_sites, is_norm, layer_index


PREFIX = "base_model.model."  # the file keys' prefix (checkpoint.PREFIX)


def _file_path(key: str) -> str:
    return key.replace(".base_layer.", ".")


def _norm_width(base: nn.Module) -> int:
    shape = getattr(base, "normalized_shape", None)
    return int(shape[-1]) if shape is not None else base.weight.shape[-1]


@register_method(
    "llama_adapter_v2",
    config=LlamaAdapterV2Config,
    category="hybrid",
    modalities=("text", "vision-language"),
    mergeable=False,
    starts_at_base=True,
    param_formula="2 d_out per linear (bias, scale) + d per norm + K d + 1 per prompted attention layer",
    position="bias / scale on the LLM's linears and norms; gated adaption prompts, visual prompt in early layers",
    paper="arXiv 2304.15010 (Gao et al. 2023, LLaMA-Adapter V2)",
    examples={"llama_adapter_v2": {"adapter_len": 4, "adapter_layers": 1, "visual_layers": 0}},
)
class LlamaAdapterV2Adapter(Adapter):
    """The registered class: built on a linear or norm layer it is a ``BiasScaleAdapter``, on an attention
    module a ``GatedPromptAdapter`` (``__new__`` picks)."""

    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)

    def __new__(cls, *args: Any, **kwargs: Any) -> "LlamaAdapterV2Adapter":
        if cls is LlamaAdapterV2Adapter and args:
            cls = BiasScaleAdapter if isinstance(args[0], LINEAR_TYPES) or is_norm(args[0]) else GatedPromptAdapter
        return super().__new__(cls)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]],
                       config: LlamaAdapterV2Config) -> list[str]:
        sites = find_sites(model, config.visual_module)
        if len(sites.visual) > 1:
            raise ConfigError(f"LlamaAdapterV2Config.visual_module: {config.visual_module!r} names "
                              f"{len(sites.visual)} modules {sites.visual[:3]}; give a longer path suffix")
        config.resolve_layers(len(sites.attention), bool(sites.visual), type(model).__name__)
        if config.visual_layers:
            config.visual_module = sites.visual[0].replace(".base_layer", "")  # the path the hook goes on
        n = len(sites.attention)
        prompted = sites.attention[:config.visual_layers] + sites.attention[n - config.adapter_layers:]
        paths = (sites.linears if config.bias_scale else []) + (sites.norms if config.tune_norms else [])
        if not paths and not prompted:
            raise ConfigError("LlamaAdapterV2Config: nothing to train (bias_scale and tune_norms are False and "
                              "visual_layers + adapter_layers is 0)")
        return paths + prompted  # inner layers first: an attention module is wrapped after its projections

    @classmethod
    def param_count(cls, base: nn.Module, config: LlamaAdapterV2Config, key: str = "") -> int:
        if isinstance(base, LINEAR_TYPES):
            return 2 * layer_dims(base)[0]
        if is_norm(base):
            return _norm_width(base) * (2 if getattr(base, "bias", None) is not None else 1)
        return config.adapter_len * base.config.hidden_size + 1

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """The prompt adapters learn their name (a mixed batch routes their prompts' projections by it); the early
        layers' get the model's visual stash."""
        for _, layer in adapter_layers(model):
            adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
            if isinstance(adapter, GatedPromptAdapter):
                adapter.__dict__["adapter_name"] = adapter_name
                if adapter.visual_path:
                    adapter.__dict__["stash"] = vis.stash_of(model)

    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        paths = {a.visual_path for _, layer in adapter_layers(model) for a in layer.adapters.values()
                 if isinstance(a, GatedPromptAdapter) and a.visual_path}
        if paths:
            vis.install(model, sorted(paths))

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        vis.uninstall(model)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - subclasses
        raise NotImplementedError

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        """``<module path>.<suffix>``, the path without the ``base_layer`` of an attention wrapper around the module:
        a projection's keys do not depend on whether its attention layer is prompted (or wrapped by another
        adapter) when saving or loading."""
        path = self.__dict__["file_path"]
        return {f"{PREFIX}{path}.{suffix}": getattr(self, name) for name, suffix in self.checkpoint_keys.items()}


class BiasScaleAdapter(LlamaAdapterV2Adapter):
    """y = s ⊙ (out + b) on a linear layer (b always) or a norm (b where the norm has a bias)."""

    merged_params = ("weight", "bias")

    def __init__(self, base: nn.Module, config: LlamaAdapterV2Config, key: str = "", init: bool = True) -> None:
        Adapter.__init__(self)
        self.__dict__["file_path"] = _file_path(key)
        self.norm = not isinstance(base, LINEAR_TYPES)
        d = _norm_width(base) if self.norm else layer_dims(base)[0]
        self.weight_axis = -1 if self.norm or is_transposed(base) else 0  # Linear (out, in), Conv1D (in, out)
        weight = getattr(base, "weight", None)
        device = weight.device if weight is not None else None
        dtype = adapter_dtype(weight)
        self.adapter_scale = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        with_bias = not self.norm or getattr(base, "bias", None) is not None
        if with_bias:
            self.adapter_bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        else:
            self.register_parameter("adapter_bias", None)
        self.checkpoint_keys = {"adapter_scale": "adapter_scale", **({"adapter_bias": "adapter_bias"} if with_bias
                                                                     else {})}

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        scale = self.adapter_scale
        return fn.bias_scale(out.to(scale.dtype), scale, self.adapter_bias).to(out.dtype)

    def _vec(self, p: Tensor | None, like: Tensor) -> Tensor | None:
        return None if p is None else p.to(like.device, like.dtype)

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        return fn.merge_weight(weight, self._vec(self.adapter_scale, weight), self.weight_axis), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return fn.unmerge_weight(weight, self._vec(self.adapter_scale, weight), self.weight_axis)

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return fn.merge_bias(value, self._vec(self.adapter_scale, value), self._vec(self.adapter_bias, value))

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return fn.unmerge_bias(value, self._vec(self.adapter_scale, value), self._vec(self.adapter_bias, value))

    def missing_param(self, base: nn.Module, name: str) -> Tensor | None:
        """A bias-free linear layer gets a zero bias for the merge (unmerge removes it); a norm without an affine
        weight a unit one."""
        if (name == "bias") == self.norm:
            return None
        ref = getattr(base, "weight", None)
        ref = ref if ref is not None else self.adapter_scale
        return torch.full_like(self.adapter_scale, 0.0 if name == "bias" else 1.0, device=ref.device, dtype=ref.dtype)


class GatedPromptAdapter(LlamaAdapterV2Adapter, AdaptionPromptAdapter):
    """V1's adaption prompt and gate on one attention layer; in an early layer, the visual prompt is added to it."""

    layer_cls = AdaptionPromptAdapter.layer_cls
    checkpoint_keys = AdaptionPromptAdapter.checkpoint_keys
    merged_params = AdaptionPromptAdapter.merged_params
    repeats_output_bias = False  # the prompt term joins before W_o: its bias counts once

    def __init__(self, base: nn.Module, config: LlamaAdapterV2Config, key: str = "", init: bool = True) -> None:
        AdaptionPromptAdapter.__init__(self, base, config, key, init)
        self.__dict__["file_path"] = _file_path(key)
        early = bool(key) and config.visual_layers and layer_index(key) < config.visual_layers
        self.visual_path = config.visual_module if early else ""
        self.__dict__["stash"] = None  # the model's VisualStash, linked by after_inject
        self.__dict__["adapter_name"] = "default"  # set by after_inject

    def check_merge(self, base: nn.Module) -> None:
        raise ValueError("llama_adapter_v2: the adaption prompts act in the attention and cannot be merged into "
                         "weights; merge the bias / scale part alone with "
                         "peftkit.methods.llama_adapter_v2.merge_bias_scale(model)")

    def attend(self, base: nn.Module, query: Tensor) -> Tensor:
        stash = self.__dict__["stash"]
        visual = stash.get() if stash is not None else None
        projections = [m for n in (self.k_name, self.v_name) if n is not None
                       and isinstance(m := base._modules[n], AdapterLayer) and m.routing is not None]
        if visual is None and not projections:
            return AdaptionPromptAdapter.attend(self, base, query)
        if visual is not None and (visual.shape[0] != query.shape[0]
                                   or visual.shape[-1] != self.adaption_prompt.shape[-1]):
            raise ValueError(f"llama_adapter_v2: the call's visual prompt is {tuple(visual.shape)} (images, width); "
                             f"early fusion needs one image per batch row, ({query.shape[0]}, "
                             f"{self.adaption_prompt.shape[-1]})")
        # a mixed batch (adapter_names): this adapter's prompts go through its own bias / scale only
        own = [self.__dict__["adapter_name"]] * (1 if visual is None else visual.shape[0])
        with routing.routed(projections, own) if projections else contextlib.nullcontext():
            keys, values = (self._project(base, query.dtype, query.shape[0]) if visual is None
                            else self._visual_keys_values(base, query.dtype, visual))
        return F.scaled_dot_product_attention(query, keys, values, scale=self.head_dim ** -0.5)

    def _visual_keys_values(self, base: nn.Module, dtype: torch.dtype, visual: Tensor) -> tuple[Tensor, Tensor]:
        """Keys W_k P' and gated values g W_v P' of P' = P + v per row, (batch, heads, K, head_dim) each."""
        prompt = self.adaption_prompt + visual.to(self.adaption_prompt.dtype)[:, None, :]  # (batch, K, d)
        key, value = self.prompt_heads(base, prompt)
        return key.to(dtype), value.to(dtype)


def merge_bias_scale(model: Any, adapter_name: str = "default") -> int:
    """Fold the bias / scale part of ``adapter_name`` into the weights of its linear and norm layers (the prompts
    stay, unmerged); ``unmerge_adapter`` (or ``unmerge_bias_scale``) restores the weights bit for bit. Returns the
    number of layers merged."""
    layers = _bias_scale_layers(model, adapter_name)
    for layer in layers:
        layer.merge([adapter_name])
    return len(layers)


def unmerge_bias_scale(model: Any, adapter_name: str = "default") -> None:
    for layer in _bias_scale_layers(model, adapter_name):
        if adapter_name in layer.merged_adapters:
            layer.unmerge([adapter_name])


def _bias_scale_layers(model: Any, adapter_name: str) -> list:
    found = [layer for _, layer in adapter_layers(model)
             if isinstance(layer.adapters[adapter_name] if adapter_name in layer.adapters else None, BiasScaleAdapter)]
    if not found:
        raise ValueError(f"merge_bias_scale: no llama_adapter_v2 bias / scale layers of adapter {adapter_name!r}")
    return found
