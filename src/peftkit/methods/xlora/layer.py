"""X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148): a mixture of LoRA experts with learned token-level scalings.

Given n frozen LoRA experts ``(A_i, B_i, s_i)`` (loaded from LoRA adapter folders, ``XLoraConfig.adapters``), each
call runs the model twice:

1. scaling pass (no grad): every expert weighted by ``scaling_pass_value``; the last hidden state ``h (b, s, H)``
   goes through the scaling head (``xlora_depth`` Linear layers, ReLU between, width ``xlora_size``), giving
   ``lambda = softmax(head(h) / T)`` of shape ``(b, s, L, n)`` (L: adapted layers; without
   ``layerwise_scalings`` one ``(b, s, n)`` broadcast to all L);
2. the real pass: on adapted layer l, ``y = W0 x + g sum_i s_i B_i A_i (lambda_{l,i} * x)`` (``g``:
   ``global_scaling_weight``), with optionally only the top-k ``lambda`` kept per token (and re-normalised by a
   softmax over them with ``enable_softmax_topk``). On an embedding (token ids ``t``) the weight multiplies the
   looked-up rank vectors: ``y = W0[t] + g sum_i s_i (lambda_{l,i} * A_i^T[t]) B_i^T``, times the base's
   ``embed_scale`` when it has one (Gemma), without expert dropout (peft's ``XLoraEmbeddingLayer``).
   Convolution experts are refused (``experts.py``: peft's ``XLoraConv2dLayer`` is not well defined).

What trains: the head only, ``sum_j out_j (in_j + 1)`` parameters (peft's count); the experts stay frozen unless
``use_trainable_adapters``. Per-call state (the scalings) lives in a thread-local (``hook.py``), never on the
layers. The head is adapter-level state (``TunerModel.shared_state``), saved as peft names it:
``base_model.internal_xlora_classifier.layers.<i>.weight`` / ``.bias``. Not mergeable (the weights depend on
the token).

Where peftkit differs from peft 0.21.2 (peft's behaviour is a bug in each case):
- peft's save drops every head tensor whose ``layers.<i>`` index equals an expert's internal name ("0", "1",
  ...: its adapter-name filter), so its files lack the head's first Linear; peftkit writes the whole head, and
  loading a peft file keeps the (seeded) rebuilt layers it lacks, with a warning naming them.
- peft also writes each expert into a subfolder ``<i>/`` with keys its LoRA loader cannot read back (the
  layer-index filter again, and the base weights). peftkit writes the head only; the experts stay where
  ``adapters`` points (peft needs ``adapters=`` at load for local folders anyway).
- peft only applies the experts when ``adapters`` is keyed "0", "1", ... (it activates the user's names but
  loads the experts as "0", "1", ...); peftkit takes any names, in the dict's order.
- peft refuses a model with ``config.use_cache=True`` and generates without a KV cache; peftkit keeps a second
  cache for the scaling pass (``hook.py``), so generation with the cache gives the tokens of peft's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import embed_scale, layer_dims
from ...layers import Adapter, SharedState
from ...registry import register_method
from ...targeting import pattern_value
from ..lora.layer import LoraAdapter
from . import functional as XF
from . import hook
from .config import XLoraConfig
from .experts import SUPPORTED, expert_tensors, read_experts

_MAX_HEAD = 1024  # head tensors the file may name: layers.0 ... layers.1023


def _experts(config: XLoraConfig) -> tuple[list, list[str]]:
    found = vars(config).get("_xlora_experts")
    if found is None:
        raise ValueError("XLoraConfig: its experts are read when the adapter is added (get_peft_model / "
                         "from_pretrained); this config was not used to add one")
    return found


@register_method(
    "xlora", config=XLoraConfig, category="hybrid", modalities=("text", "generation"), mergeable=False,
    param_formula="scaling head: sum_j out_j (in_j + 1) once (out of the last: n_experts [x L layerwise]); "
                  "experts frozen",
    position="token-level mixture of frozen LoRA experts beside each layer an expert adapts",
    starts_at_base=False,
    paper="arXiv 2402.07148 (X-LoRA)",
    # an X-LoRA is built from LoRA expert folders: with none (the registry can name no folder) it raises
    # NotApplicableError, which the contract suite reports; tests/methods/test_xlora.py runs the contract's
    # checks on a real one
    examples={"xlora": {"hidden_size": 32, "adapters": {}, "xlora_depth": 2, "xlora_size": 8}},
)
class XLoraAdapter(Adapter):
    supported_layers = SUPPORTED
    default_roles = ()
    uses_shared_state = True
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {
        f"layers_{i}_{p}": f"internal_xlora_classifier.layers.{i}.{p}" for i in range(_MAX_HEAD) for p in ("weight", "bias")}

    # -- targets, head, layers --------------------------------------------------------------------------
    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: XLoraConfig) -> list[str]:
        """Every module some expert adapts, in the model's module order (peft's layer numbering)."""
        experts = read_experts(model, named, config.adapters)
        covered = {p for e in experts for p in e.paths}
        paths = [p for p, _ in named if p in covered]
        vars(config)["_xlora_experts"] = (experts, paths)
        return paths

    @classmethod
    def build_shared(cls, targets: list[tuple[str, nn.Module]], config: XLoraConfig,
                     others: dict[str, Any]) -> dict[str, Tensor]:
        """The scaling head, initialised as ``nn.Linear`` (peft's), in the base weights' dtype, as Parameters."""
        ref = targets[0][1].weight
        n_out = len(config.adapters) * (len(targets) if config.layerwise_scalings else 1)
        out = {}
        idx = XF.head_indices(config.xlora_depth, config.xlora_dropout_p)
        for i, (o, n_in) in zip(idx, XF.head_shapes(config.hidden_size, config.xlora_size, config.xlora_depth, n_out)):
            lin = nn.Linear(n_in, o, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            out[f"layers_{i}_weight"], out[f"layers_{i}_bias"] = lin.weight, lin.bias
        return out

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: XLoraConfig) -> int:
        n_out = len(config.adapters) * (len(targets) if config.layerwise_scalings else 1)
        return XF.head_param_count(config.hidden_size, config.xlora_size, config.xlora_depth, n_out)

    @classmethod
    def param_count(cls, base: nn.Module, config: XLoraConfig, key: str = "") -> int:
        """0 per layer (the experts are frozen); with ``use_trainable_adapters`` their ``r (d_in + d_out)``."""
        if not config.use_trainable_adapters:
            return 0
        d_out, d_in = layer_dims(base)
        experts, _ = _experts(config)
        return sum(pattern_value(e.config.rank_pattern, key, e.config.r) * (d_in + d_out)
                   for e in experts if key in e.paths)

    def __init__(self, base: nn.Module, config: XLoraConfig, key: str = "", init: bool = True,
                 shared: SharedState | None = None) -> None:
        super().__init__()
        experts, paths = _experts(config)
        if shared is None:
            raise ValueError("XLoraAdapter: built by the tuner only (its scaling head is adapter-level state)")
        self.__dict__["shared"] = shared
        self.__dict__["config"] = config
        self.owner = id(shared)
        self.layer_number = paths.index(key)
        self.experts = nn.ModuleList()
        ids = []
        for e in (e for e in experts if key in e.paths):
            lora = LoraAdapter(base, e.config, key, init=False)
            if lora.lora_A.is_meta:  # a meta build for loading: the experts come from their folders, not the file
                raise NotImplementedError("X-LoRA experts are read from their folders")
            with torch.no_grad():
                for name, value in expert_tensors(e, key, lora).items():
                    getattr(lora, name).copy_(value)
            lora.requires_grad_(False)
            self.experts.append(lora)
            ids.append(e.index)
        self.expert_ids = ids
        # the head's tensors, registered here too (the same Parameters: counted and trained once)
        for name, tensor in shared.tensors().items():
            self.register_parameter(name, tensor)
        self.train_experts = config.use_trainable_adapters

    def requires_grad_(self, requires_grad: bool = True) -> "XLoraAdapter":
        for p in self._parameters.values():
            if p is not None:
                p.requires_grad_(requires_grad)
        for lora in self.experts:
            lora.requires_grad_(requires_grad and self.train_experts)
        return self

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        config = self.config
        scalings = hook.scalings_for(self.owner)
        weights, factor = None, 1.0
        embedding = isinstance(base, nn.Embedding)
        if scalings is not None:
            if x.dim() != (2 if embedding else 3) or tuple(x.shape[:2]) != tuple(scalings.shape[:2]):
                raise ValueError(f"X-LoRA: layer input of shape {tuple(x.shape)} does not start with the call's "
                                 f"(batch, sequence) {tuple(scalings.shape[:2])}")
            layer = XF.layer_weights(scalings[:, :, self.layer_number, :], config.top_k_lora,
                                     config.enable_softmax_topk)
            weights = layer[..., self.expert_ids] if len(self.expert_ids) != layer.shape[-1] else layer
            factor = config.global_scaling_weight
        As = [e.lora_A for e in self.experts]
        Bs = [e.lora_B for e in self.experts]
        scales = [e.scaling for e in self.experts]
        if embedding:  # peft's XLoraEmbeddingLayer: no expert dropout; the base's embed_scale on the delta
            delta = XF.embedding_mixture(x, As, Bs, scales, weights, factor, base, embed_scale(base))
            return out.add_(delta.to(out.dtype))
        x = x.to(As[0].dtype)
        dropouts = [e.dropout for e in self.experts]
        if self.training and any(d is not None for d in dropouts):  # one mask per expert, as peft draws them
            delta = XF.mixture_reference(x, As, Bs, scales, weights, factor, dropouts)
        else:
            delta = XF.mixture(x, As, Bs, scales, weights, factor)
        return out.add_(delta.to(out.dtype))

    # -- the call --------------------------------------------------------------------------------------------
    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        hook.install(model)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        hook.remove(model)

    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> Any:
        """The active, enabled X-LoRA adapters of this call (their heads run in the scaling pass)."""
        tuner = model.base_model
        owners = {}
        for name in tuner.active_adapters:
            config = tuner.peft_config.get(name)
            if not isinstance(config, XLoraConfig) or name not in tuner.shared_state:
                continue
            layers = [layer for _, layer in tuner.adapter_layers() if name in layer.adapters]
            if not layers or layers[0].disable_adapters:
                continue
            shared = tuner.shared_state[name]
            owners[id(shared)] = hook.Owner(config, shared, len(_experts(config)[1]))
        return hook.xlora_call(owners) if owners else None
