"""LLaMA-Adapter's adaption prompts (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention", arXiv 2303.16199).

In each of the top ``adapter_layers`` attention layers, the queries also attend over ``adapter_len`` learned
prompt tokens P, on their own softmax, scaled by a gate g that starts at zero (so the model starts exactly at
the base). Per head h, with the layer's own queries q_h (rotary embedding included):

    out = W_o concat_h [ Attn_h(x)  +  g softmax(q_h P_k,h^T / sqrt(d_h)) P_v,h ]

where ``P_k = W_k P``, ``P_v = W_v P`` are the layer's own projections of the prompt (no rotary embedding;
grouped-query attention: each key/value head serves its group of query heads). W_o is linear, so this equals
Hugging Face PEFT's ``W_o Attn(x) + W_o (prompt term)`` up to rounding. The term is added to the output
projection's input and the queries are the ones the attention computed, taken from the query projection's
output: no projection runs twice per step. With an output-projection bias, PEFT's
second ``o_proj`` call adds the bias once more; so does this module (matching PEFT's numbers, so such a model
does not start exactly at the base). On GPT-2 the fused ``c_attn`` gives queries, keys and values and, as in
PEFT, the prompts' output is added after the output projection, without it.

Parameters per layer: the prompt P (1, adapter_len, d) and the gate (1,). Keys as in PEFT:
``<attention path>.adaption_prompt`` / ``.adaption_gate``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import PeftConfig
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
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            self._check(isinstance(value, int) and value >= 1, name, "a positive int")

    @property
    def is_adaption_prompt(self) -> bool:
        return True


_ROPE: list = [None]  # the last (cos, sin, their versions, pairs): every adapted layer of a step reads the same


def _rope_pairs(cos: Tensor, sin: Tensor, q_len: int, head_dim: int) -> Tensor:
    """(cos, swap(sin)) of a step, (batch or 1, q, 1, 2, head_dim) (see ``queries``), built once per step: the
    model hands every layer the same ``position_embeddings`` tensors, so the last pair is kept by identity."""
    last = _ROPE[0]
    if last is not None and last[0] is cos and last[1] is sin and last[2] == (cos._version, sin._version):
        return last[3]
    half = head_dim // 2
    pairs = torch.cat((cos, sin.narrow(-1, half, half), sin.narrow(-1, 0, half)), dim=-1)
    pairs = pairs.view(-1, q_len, 1, 2, head_dim)
    _ROPE[0] = (cos, sin, (cos._version, sin._version), pairs)
    return pairs


def _params(module: nn.Module) -> list[Tensor]:
    """The module's parameters (a plain projection's without the generic recursive walk)."""
    if module._modules:
        return list(module.parameters())
    return [p for p in module._parameters.values() if p is not None]


def _param(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name, None)``; a plain projection's read from its ``_parameters``, without nn.Module's
    attribute fallback (a wrapper, e.g. LoRA's, lends its base layer's)."""
    return getattr(module, name, None) if module._modules else module._parameters.get(name)


class AttentionAdapterLayer(AdapterLayer):
    """An ``AdapterLayer`` around an attention module, called with the attention's own arguments (keywords
    included). For the length of the call, a hook on the query projection keeps its output and a pre-hook on
    the output projection adds the active adapters' prompt terms to its input, the heads' outputs (no output
    projection: the terms are added to the attention output). The hooks act only in the calling thread."""

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
        adapters = [registered[n] for n in names]
        geometry = adapters[0]  # projection names and head sizes: the layer's, the same for every adapter
        q_proj, o_proj = base._modules[geometry.q_name], base._modules.get(geometry.o_name)
        thread, projected = threading.get_ident(), []

        def with_prompts(x: Tensor) -> Tensor:
            """``x`` (batch, q, heads * head_dim) plus the adapters' terms, in ``x``'s dtype."""
            if not projected:
                raise RuntimeError(f"adaption_prompt: {type(base).__name__} did not call its "
                                   f"{geometry.q_name!r} projection")
            q = geometry.queries(projected[-1], kwargs)
            total = None
            for name, adapter in zip(names, adapters):
                term = adapter.attend(base, q)  # (heads, batch * q, head_dim)
                if routing is not None:  # a mixed batch: only this adapter's rows get its term
                    term = term * self._rows([name], term).repeat_interleave(x.shape[1]).view(1, -1, 1)
                total = term if total is None else total + term
            total = total.transpose(0, 1)  # (batch * q, heads, head_dim)
            if total.dtype != x.dtype:
                total = total.to(x.dtype)
            return (x.reshape(total.shape) + total).reshape(x.shape)

        def keep_query(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            if threading.get_ident() == thread:
                projected.append(out)

        def add_to_heads(module: nn.Module, inputs: tuple) -> tuple | None:
            if threading.get_ident() == thread:
                return (with_prompts(inputs[0]), *inputs[1:])
            return None

        hooks = [q_proj.register_forward_hook(keep_query)]
        if o_proj is not None:
            hooks.append(o_proj.register_forward_pre_hook(add_to_heads))
        try:
            out = base(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        bias = None if o_proj is None else _param(o_proj, "bias")
        if o_proj is not None and bias is None:
            return out
        attn, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        if o_proj is None:
            attn = with_prompts(attn)
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

    def __init__(self, base: nn.Module, config: AdaptionPromptConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        model_type = base.config.model_type
        _, self.q_name, self.k_name, self.v_name, self.o_name = MODEL_TABLE[model_type]
        self.adapter_len = config.adapter_len
        self.num_heads = base.config.num_attention_heads
        self.head_dim = base.head_dim
        self.rotary = model_type != "gpt2"
        weight = getattr(base, self.k_name).weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        d = base.config.hidden_size
        self.adaption_prompt = nn.Parameter(torch.empty(1, config.adapter_len, d, device=weight.device,
                                                        dtype=dtype).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MODEL_TABLE:
            raise NotApplicableError(
                f"adaption_prompt supports {sorted(MODEL_TABLE)} attention, not {type(model).__name__} "
                f"(model_type {model_type!r}); prompt_tuning / prefix_tuning apply to most transformers LMs")
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

    def queries(self, projected: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The step's queries in the layout ``attend`` takes, from the query projection's output (batch, q, ...):
        (heads, batch * q, head_dim). With a rotary embedding (``position_embeddings``: cos, sin of shape
        (batch or 1, q, head_dim)) the pair (q * cos, q * swap(sin)), (heads, batch * q, 2 head_dim): by halves,
        rope(q) . k = (q * cos) . k + (q * swap(sin)) . (k2, -k1) with swap(sin) = (sin2, sin1), so the rotation
        moves onto the prompts' keys, which are cached (``_project``)."""
        bsz, q_len = projected.shape[:2]
        heads, head_dim = self.num_heads, self.head_dim
        if self.v_name is None:  # fused projection: (query, key, value)
            projected = projected.narrow(-1, 0, heads * head_dim)
        if not self.rotary:
            return projected.reshape(bsz * q_len, heads, head_dim).transpose(0, 1)
        cos_sin = _rope_pairs(*kwargs["position_embeddings"], q_len, head_dim)
        q = projected.reshape(bsz, q_len, heads, 1, head_dim) * cos_sin  # (batch, q, heads, 2, head_dim)
        return q.reshape(bsz * q_len, heads, 2 * head_dim).transpose(0, 1)

    def attend(self, base: nn.Module, q: Tensor) -> Tensor:
        """g softmax(q P_k^T / sqrt(d_h)) P_v, (heads, batch * q, head_dim), for the queries from ``queries``."""
        keys, values = self._keys_values(base, q.dtype)
        scores = torch.bmm(q, keys)  # (heads, batch * q, adapter_len)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.bmm(probs if probs.dtype == q.dtype else probs.to(q.dtype), values)

    def _keys_values(self, base: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The keys ``attend`` takes, (heads, head_dim or 2 head_dim, adapter_len), and ``g P_v`` (heads,
        adapter_len, head_dim), in ``dtype``. Without autograd (inference, every decoding step) they are computed
        once and cached, keyed on the version counters of the prompt, the gate and the projections, so an
        optimizer step, a load or a merge recomputes them."""
        if torch.is_grad_enabled():
            return self._project(base, dtype)
        params = self._parameters
        tensors = [params["adaption_prompt"], params["adaption_gate"]]
        for name in (self.k_name, self.v_name):
            if name is not None:
                tensors += _params(base._modules[name])
        # storage address and version counter: a new tensor, a `.data` swap, a `.to()` or an in-place update
        key = (dtype, [(t.data_ptr(), t._version) for t in tensors])
        cached = self.__dict__.get("_kv_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._project(base, dtype))
            self.__dict__["_kv_cache"] = cached
        return cached[1]

    def _project(self, base: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        prompt, head_dim = self.adaption_prompt, self.head_dim  # (1, adapter_len, d)
        if self.v_name is None:  # fused projection: (query, key, value)
            _, key, value = getattr(base, self.k_name)(prompt).split(prompt.shape[-1], dim=2)
        else:
            key, value = getattr(base, self.k_name)(prompt), getattr(base, self.v_name)(prompt)
        kv_heads = key.shape[-1] // head_dim
        key = key.view(self.adapter_len, kv_heads, head_dim).permute(1, 2, 0)  # (kv_heads, head_dim, adapter_len)
        value = value.view(self.adapter_len, kv_heads, head_dim).transpose(0, 1)
        repeat = self.num_heads // kv_heads  # grouped-query attention: each key/value head serves several
        key = key.repeat_interleave(repeat, dim=0) / math.sqrt(head_dim)
        if self.rotary:  # (k, (k2, -k1)): see ``queries``
            k1, k2 = key.split(head_dim // 2, dim=1)
            key = torch.cat((key, k2, -k1), dim=1)
        value = self.adaption_gate * value.repeat_interleave(repeat, dim=0)
        return key.to(dtype).contiguous(), value.to(dtype).contiguous()
