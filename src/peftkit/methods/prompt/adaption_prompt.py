"""LLaMA-Adapter's adaption prompts (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention", arXiv 2303.16199).

In each of the top ``adapter_layers`` attention layers, the queries also attend over ``adapter_len`` learned
prompt tokens, on their own softmax, scaled by a gate g that starts at zero (so the model starts exactly at
the base):  ``out = Attn(x) + W_o (g * softmax(q P_k^T / sqrt(d_h)) P_v)``, where ``P_k = W_k P``,
``P_v = W_v P`` (the layer's own projections, no rotary embedding), and the queries carry their rotary
embedding. Parameters per layer: the prompt P (1, adapter_len, d) and the gate (1,). Keys as in Hugging Face
PEFT: ``<attention path>.adaption_prompt`` / ``.adaption_gate``. On GPT-2 the fused ``c_attn`` gives keys and
values and, as in PEFT, the prompt's output is added without the output projection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import PeftConfig
from ...layers import Adapter, AdapterLayer
from ...registry import register_method
from ...targeting import NotApplicableError

# model_type -> (attention module name, key projection, value projection (None: fused with the key's),
# output projection (None: not applied))
MODEL_TABLE: dict[str, tuple[str, str, str | None, str | None]] = {
    "llama": ("self_attn", "k_proj", "v_proj", "o_proj"),
    "mistral": ("self_attn", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("attn", "c_attn", None, None),
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


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class AttentionAdapterLayer(AdapterLayer):
    """An ``AdapterLayer`` around an attention module: called with the attention's own arguments (keywords
    included), it adds each active adapter's term to the attention output (the first element it returns)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = [n for n in self.active_adapters if n in self.adapters]
        if self.disable_adapters or not names:
            return out
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        for name in names if self.routing is None else dict.fromkeys(self.routing):
            if name not in names:
                continue
            term = self.adapters[name].term(self.base_layer, hidden, kwargs)
            if self.routing is not None:  # a mixed batch: only this adapter's rows get its term
                rows = torch.tensor([r == name for r in self.routing], device=term.device).view(-1, 1, 1)
                term = term * rows
            attn = (attn + term).to(attn.dtype)
        return attn if rest is None else (attn, *rest)


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
        _, self.k_name, self.v_name, self.o_name = MODEL_TABLE[model_type]
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

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - see term()
        raise NotImplementedError("adaption prompts act through AttentionAdapterLayer.forward")

    def _queries(self, base: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """(batch, heads, q, head_dim), with the rotary embedding the attention itself applies."""
        bsz, q_len, _ = hidden.shape
        if self.rotary:
            q = base.q_proj(hidden).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            return q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        q = base.c_attn(hidden).split(base.split_size, dim=2)[0]
        return q.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

    def _keys_values(self, base: nn.Module, embed_dim: int) -> tuple[Tensor, Tensor]:
        """The prompts' keys and values (1, heads, adapter_len, head_dim). Without autograd (inference,
        every decoding step) they are computed once and cached, keyed on the version counters of the
        prompt and the projections, so an optimizer step, a load or a merge recomputes them."""
        if torch.is_grad_enabled():
            return self._project(base, embed_dim)
        projs = [getattr(base, n) for n in (self.k_name, self.v_name) if n is not None]
        tensors = [self.adaption_prompt] + [p for m in projs for p in m.parameters()]
        key = tuple((id(t), t._version, t.device, t.dtype) for t in tensors)
        cached = self.__dict__.get("_kv_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._project(base, embed_dim))
            self.__dict__["_kv_cache"] = cached
        return cached[1]

    def _project(self, base: nn.Module, embed_dim: int) -> tuple[Tensor, Tensor]:
        prompt = self.adaption_prompt
        if self.v_name is None:  # fused projection: (query, key, value)
            _, key, value = getattr(base, self.k_name)(prompt).split(embed_dim, dim=2)
        else:
            key, value = getattr(base, self.k_name)(prompt), getattr(base, self.v_name)(prompt)
        kv_heads = key.shape[-1] // self.head_dim
        key = key.view(1, self.adapter_len, kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(1, self.adapter_len, kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.num_heads // kv_heads  # grouped-query attention: each key/value head serves several
        return key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)

    def term(self, base: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """What the prompts add to the attention output: W_o (g * softmax(q P_k^T / sqrt(d_h)) P_v)."""
        bsz, q_len, d = hidden.shape
        key, value = self._keys_values(base, d)
        q = self._queries(base, hidden, kwargs)
        dtype = q.dtype
        scores = torch.matmul(q, key.transpose(2, 3).to(dtype)) / math.sqrt(self.head_dim)
        scores = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        out = torch.matmul(scores, value.to(scores.dtype)).transpose(1, 2).reshape(bsz, q_len, -1)
        if self.o_name is not None:
            out = getattr(base, self.o_name)(out)
        return out
