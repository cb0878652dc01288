"""LLaMA-Adapter's adaption prompts (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention", arXiv 2303.16199).

In each of the top ``adapter_layers`` attention layers, the queries also attend over ``adapter_len`` learned
prompt tokens P, on their own softmax, scaled by a gate g that starts at zero (so the model starts exactly at
the base). Per head h, with the layer's own queries q_h (rotary embedding included):

    out = W_o concat_h [ Attn_h(x)  +  g softmax(q_h P_k,h^T / sqrt(d_h)) P_v,h ]

where ``P_k = W_k P``, ``P_v = W_v P`` are the layer's own projections of the prompt (no rotary embedding;
grouped-query attention: each key/value head serves its group of query heads). The term joins the heads'
outputs before W_o, so this equals Hugging Face PEFT's ``W_o Attn(x) + W_o (prompt term)`` up to rounding.

The queries are the attention's own, rotary embedding applied: for the length of an adapted call, the
attention module reads a config whose ``_attn_implementation`` names ``attention_with_prompts`` (registered
with transformers' ``AttentionInterface``), which runs the model's own attention function and adds the
prompts' term, one ``scaled_dot_product_attention`` over the cached prompt keys and values. No projection runs
twice and no hook is registered. With an output-projection bias, PEFT's second ``o_proj`` call adds the bias
once more; so does this module (matching PEFT's numbers, so such a model does not start exactly at the base).
On GPT-2 the fused ``c_attn`` gives the prompts' keys and values and, as in PEFT, the prompts' output is added
after the output projection, without it (an adapted GPT-2 layer runs the attention function its config names,
never the eager ``reorder_and_upcast_attn`` variant).

Parameters per layer: the prompt P (1, adapter_len, d) and the gate (1,). Keys as in PEFT:
``<attention path>.adaption_prompt`` / ``.adaption_gate``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import PeftConfig, check_int
from ...kernel_helpers import adapter_dtype
from ...layers import Adapter, AdapterLayer
from ...registry import register_method
from ...targeting import NotApplicableError

# model_type -> (attention module name, query projection, key projection, value projection (None: fused with
# the key's, as (query, key, value)), output projection (None: the prompts' output is added after it))
MODEL_TABLE: dict[str, tuple[str, str, str, str | None, str | None]] = {
    "llama": ("self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("attn", "c_attn", "c_attn", None, None),
}


@dataclasses.dataclass
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter configuration (field names as in Hugging Face PEFT).

    Args:
        target_modules: name of the attention submodules (None: the architecture's, e.g. "self_attn").
        adapter_len: number of prompt tokens per layer.
        adapter_layers: number of layers, counted from the top, that get prompts.
    """

    PEFT_TYPE: ClassVar[str] = "ADAPTION_PROMPT"

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("adapter_len", "adapter_layers"):  # None until set: checked again at get_peft_model (peft
            check_int(self, name, 1, optional=True, expected="a positive int")  # also builds such a config and
            # refuses it there)

    def check_complete(self) -> None:
        """Both sizes set: the adapter cannot be built without them."""
        for name in ("adapter_len", "adapter_layers"):
            self._check(getattr(self, name) is not None, name, "a positive int (it is not set)")

    @property
    def is_adaption_prompt(self) -> bool:
        return True


def _param(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name, None)``; a plain projection's read from its ``_parameters``, without nn.Module's
    attribute fallback (a wrapper, e.g. LoRA's, lends its base layer's)."""
    return getattr(module, name, None) if module._modules else module._parameters.get(name)


def _params(module: nn.Module) -> list[Tensor]:
    """The module's parameters (a plain projection's without the generic recursive walk)."""
    if module._modules:
        return list(module.parameters())
    return [p for p in module._parameters.values() if p is not None]


_IMPLEMENTATION = "peftkit_adaption_prompt"  # the attention-function name adapted calls dispatch to
_PROMPTS = "peftkit_adaption_prompts"  # the keyword that carries an adapted call's adapters to that function
_ATTENTION_FUNCTIONS: list = []  # transformers' ALL_ATTENTION_FUNCTIONS, once the function is registered


class _AdaptedConfig:
    """An attention module's config for the length of an adapted call: every field is the model's config's,
    except ``_attn_implementation``, which names ``attention_with_prompts``."""

    _attn_implementation = _IMPLEMENTATION

    def __init__(self, config: Any) -> None:
        self.__dict__["config"] = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["config"], name)


def attention_with_prompts(module: nn.Module, query: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
    """The model's own attention function (the one its config names), plus each adapter's prompt term on the
    heads' outputs, (batch, q, heads, head_dim); GPT-2's terms are handed back to the layer, which adds them
    after the output projection. ``query``: (batch, heads, q, head_dim), rotary embedding applied."""
    call = kwargs.pop(_PROMPTS, None)  # absent: another thread calls the module during an adapted call
    config = module.config
    if isinstance(config, _AdaptedConfig):
        config = config.__dict__["config"]
        if call is not None:  # the attention function is chosen: the model's own config for the rest of the call
            module.__dict__["config"] = config
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, weights = _ATTENTION_FUNCTIONS[0].get_interface(config._attn_implementation, eager)(
        module, query, *args, **kwargs)
    if call is None:
        return out, weights
    adapters, terms = call
    total = None
    for adapter, rows in adapters:
        term = adapter.attend(module, query)  # (batch, heads, q, head_dim)
        if rows is not None:  # a mixed batch: only this adapter's rows get its term
            term = term * rows.view(-1, 1, 1, 1)
        total = term if total is None else total + term
    total = total.transpose(1, 2)
    if total.dtype != out.dtype:
        total = total.to(out.dtype)
    terms.append(total)
    return (out, weights) if adapters[0][0].o_name is None else (out + total, weights)


class AttentionAdapterLayer(AdapterLayer):
    """An ``AdapterLayer`` around an attention module, called with the attention's own arguments (keywords
    included). For the length of the call the module's attention function is ``attention_with_prompts`` (see
    the module docstring), which gets the active adapters through a keyword argument."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # submodules read from ``_modules``: nn.Module's attribute fallback, at every decoding step, costs about a
        # third of one of the adapter's matmuls each time
        base, registered = self._modules["base_layer"], self._modules["adapters"]._modules
        names = [n for n in self.active_adapters if n in registered]
        if self.disable_adapters or not names:
            return base(*args, **kwargs)
        routing = self.routing
        if routing is not None:
            names = [n for n in dict.fromkeys(routing) if n in names]
        adapters = [(registered[n], None if routing is None else self._rows([n], registered[n].adaption_gate))
                    for n in names]
        terms: list[Tensor] = []
        kwargs[_PROMPTS] = (adapters, terms)
        slots = base.__dict__
        config = slots["config"]
        slots["config"] = _AdaptedConfig(config)
        try:
            out = base(*args, **kwargs)
        finally:
            slots["config"] = config
        if not terms:  # the attention function was never called
            raise RuntimeError(f"adaption_prompt: {type(base).__name__} does not call its attention function "
                               f"through transformers' AttentionInterface")
        o_name = adapters[0][0].o_name
        repeat = o_name is not None and adapters[0][0].repeats_output_bias
        bias = _param(base._modules[o_name], "bias") if repeat else None
        if o_name is not None and bias is None:
            return out
        attn, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        if o_name is None:
            attn = attn + terms[0].reshape(attn.shape)
        else:  # PEFT's second o_proj call adds the bias once more
            attn = attn + bias * (len(names) if routing is None else self._rows(names, attn).view(-1, 1, 1))
        return attn if rest is None else (attn, *rest)

    def _rows(self, names: list[str], like: Tensor) -> Tensor:
        """(batch,): 1 on the rows routed to one of ``names``, else 0."""
        return torch.tensor([r in names for r in self.routing], dtype=like.dtype, device=like.device)


@register_method(
    "adaption_prompt",
    config=AdaptionPromptConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=True,
    param_formula="adapter_len * d + 1 per adapted layer",
    position="learned prompts with a zero-init gate in the top layers' attention",
    paper="arXiv 2303.16199 (Zhang et al. 2023, LLaMA-Adapter)",
    examples={"adaption_prompt": {"adapter_len": 4, "adapter_layers": 1}},
)
class AdaptionPromptAdapter(Adapter):
    layer_cls = AttentionAdapterLayer
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)
    checkpoint_keys: ClassVar[dict[str, str]] = {"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"}
    # PEFT's second o_proj call adds the output projection's bias once more (subclasses may not)
    repeats_output_bias: ClassVar[bool] = True

    def __init__(self, base: nn.Module, config: AdaptionPromptConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        if not _ATTENTION_FUNCTIONS:
            # late: transformers' modeling module loads on first use, not at import peftkit
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

            AttentionInterface.register(_IMPLEMENTATION, attention_with_prompts)
            _ATTENTION_FUNCTIONS.append(ALL_ATTENTION_FUNCTIONS)
        model_type = base.config.model_type
        _, self.q_name, self.k_name, self.v_name, self.o_name = MODEL_TABLE[model_type]
        self.adapter_len = config.adapter_len
        self.num_heads = base.config.num_attention_heads
        self.head_dim = base.head_dim
        weight = getattr(base, self.k_name).weight
        dtype = adapter_dtype(getattr(base, self.k_name), keep_half=True)
        d = base.config.hidden_size
        self.adaption_prompt = nn.Parameter(torch.empty(1, config.adapter_len, d, device=weight.device,
                                                        dtype=dtype).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        config.check_complete()
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MODEL_TABLE:
            raise NotApplicableError(
                f"adaption_prompt supports {sorted(MODEL_TABLE)} attention, not {type(model).__name__} "
                f"(model_type {model_type!r}); prompt_tuning / prefix_tuning apply to most transformers LMs")
        import transformers.modeling_utils  # late, as in __init__ (and older releases lack AttentionInterface)

        if not hasattr(transformers.modeling_utils, "AttentionInterface"):
            raise NotApplicableError("adaption_prompt adds its prompts through transformers' AttentionInterface; "
                                     "this transformers release has none (upgrade transformers)")
        if config.target_modules is None:
            config.target_modules = MODEL_TABLE[model_type][0]
        if not isinstance(config.target_modules, str):
            raise NotApplicableError(f"adaption_prompt: target_modules must name the attention submodule (a string), "
                                     f"got {config.target_modules!r}")
        found = [p for p, _ in named if p.endswith("." + config.target_modules)]
        if len(found) < config.adapter_layers:
            raise NotApplicableError(f"AdaptionPromptConfig.adapter_layers: {config.adapter_layers} layers asked, "
                                     f"{type(model).__name__} has {len(found)} {config.target_modules!r} modules")
        return found[-config.adapter_layers:]

    @classmethod
    def param_count(cls, base: nn.Module, config: AdaptionPromptConfig, key: str = "") -> int:
        return config.adapter_len * base.config.hidden_size + 1

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - see attend()
        raise NotImplementedError("adaption prompts act through AttentionAdapterLayer.forward")

    def attend(self, base: nn.Module, query: Tensor) -> Tensor:
        """g softmax(q P_k^T / sqrt(d_h)) P_v per head, (batch, heads, q, head_dim), for the attention's queries
        (batch, heads, q, head_dim): one ``scaled_dot_product_attention`` over the prompts (no mask)."""
        keys, values = self._keys_values(base, query.dtype, query.shape[0])
        return F.scaled_dot_product_attention(query, keys, values, scale=1 / math.sqrt(self.head_dim))

    def _keys_values(self, base: nn.Module, dtype: torch.dtype, batch: int) -> tuple[Tensor, Tensor]:
        """The prompts' keys and gated values ``attend`` takes, in ``dtype``, (batch, heads, adapter_len,
        head_dim) each (the prompts' (1, ...) tensors, expanded). Without autograd (inference, every
        decoding step) they are computed once and cached, keyed on the prompt, the gate and the key / value
        projections' parameters (storage and version counter), so an optimizer step, a load or a merge
        recomputes them."""
        if torch.is_grad_enabled():
            return self._project(base, dtype, batch)
        params = self._parameters
        tensors = [params["adaption_prompt"], params["adaption_gate"]]
        for name in (self.k_name, self.v_name):
            if name is not None:
                tensors += _params(base._modules[name])
        # storage address and version counter: a new tensor, a `.data` swap, a `.to()` or an in-place update
        key = (dtype, batch, [(t.data_ptr(), t._version) for t in tensors])
        cached = self.__dict__.get("_kv_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._project(base, dtype, batch))
            self.__dict__["_kv_cache"] = cached
        return cached[1]

    def _project(self, base: nn.Module, dtype: torch.dtype, batch: int) -> tuple[Tensor, Tensor]:
        """The prompt's keys and gated values (``prompt_heads``) for a batch: one prompt, expanded."""
        key, value = self.prompt_heads(base, self.adaption_prompt)  # (1, adapter_len, d) -> (1, heads, ...)
        return tuple(x.to(dtype).contiguous().expand(batch, -1, -1, -1) for x in (key, value))

    def prompt_heads(self, base: nn.Module, prompt: Tensor) -> tuple[Tensor, Tensor]:
        """Keys W_k P and gated values g W_v P of prompts P (rows, adapter_len, d), each (rows, heads, adapter_len,
        head_dim): grouped-query attention repeats each key / value head for its group of query heads; no rotary
        embedding."""
        if self.v_name is None:  # fused projection: (query, key, value)
            _, key, value = getattr(base, self.k_name)(prompt).split(prompt.shape[-1], dim=2)
        else:
            key, value = getattr(base, self.k_name)(prompt), getattr(base, self.v_name)(prompt)
        rows, kv_heads = prompt.shape[0], key.shape[-1] // self.head_dim

        def heads(x: Tensor) -> Tensor:
            x = x.view(rows, self.adapter_len, kv_heads, self.head_dim).transpose(1, 2)
            return x.repeat_interleave(self.num_heads // kv_heads, dim=1)

        return heads(key), heads(self.adaption_gate * value)
