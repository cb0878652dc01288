"""The model-level shadow network: backbone (producing ``s^(0)``), projection to the base width, task head.

``"mirror"`` (peft's default) builds a fresh backbone of the base decoder stack's own class from a copy of its
config with ``shadow_num_hidden_layers`` (1) blocks and the other ``shadow_*`` sizes; when it runs at the base
width and ``share_embeddings`` holds, its ``embed_tokens`` is dropped and it is fed the frozen base input
embeddings (``inputs_embeds``). Other values of ``shadow_model`` name a local folder: transformers' ``AutoModel``
(its input / output embeddings kept frozen), or a ``causal_lm_with_hidden_projection`` checkpoint bundling a
backbone with its trained shadow -> base projection. The head is the base ``score`` / ``classifier`` copied
for sequence classification; causal LMs reuse the base LM head at loss time.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from typing import Any

from torch import Tensor, nn

from ...targeting import NotApplicableError
from .config import ShadowConfig
from .dit import is_diffusion
from .dit import stack as diffusion_stack

STACKS = ("layers", "h")  # attribute names of the decoder-block ModuleList


def task(config: Any) -> str | None:
    """The config's task type as peft's string (``TaskType`` members are enums)."""
    return getattr(config.task_type, "value", config.task_type)


def _stack(module: nn.Module) -> str | None:
    return next((a for a in STACKS if isinstance(getattr(module, a, None), nn.ModuleList)), None)


def find_backbone(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(path, module, stack attribute) of the decoder stack (``model.model`` of a Llama, ``transformer`` of a
    GPT-2, a diffusers transformer itself: peft's search). Raises ``NotApplicableError`` naming what is missing."""
    if is_diffusion(model):  # a diffusers transformer is its own backbone (dit.py)
        return "", model, diffusion_stack(model)
    found = None
    for attr in ("model", "transformer", "base_model", "decoder"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module) and sub is not model:
            nested = getattr(sub, "decoder", None)
            found = nested if isinstance(nested, nn.Module) and _stack(nested) else sub
            break
    if found is None and _stack(model):
        found = model
    attr = _stack(found) if found is not None else None
    if attr is None:
        raise NotApplicableError(
            f"ShadowPEFT on {type(model).__name__}: no decoder-block stack (a ModuleList named 'layers' or 'h' under "
            "model / transformer / decoder); ShadowPEFT rides a decoder-only language model's layer loop")
    path = next(n for n, m in model.named_modules() if m is found)
    return path, found, attr


def hidden_size(config: Any) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):  # diffusers transformers: heads x head width
        return heads * head_dim
    raise NotApplicableError(f"ShadowPEFT: no hidden size (hidden_size / n_embd / d_model, or num_attention_heads x "
                             f"attention_head_dim) in {type(config).__name__}")


def _set(config: Any, names: tuple[str, ...], value: int, field: str) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise NotApplicableError(f"ShadowConfig.{field}: the base config {type(config).__name__} has none of {names}")


def mirror_config(backbone: nn.Module, config: ShadowConfig) -> Any:
    """The base backbone's config with the shadow sizes (checked before anything is built)."""
    cfg = copy.deepcopy(getattr(backbone, "config", None))
    if cfg is None:
        raise NotApplicableError(f"ShadowPEFT: the decoder stack {type(backbone).__name__} has no config to mirror")
    _set(cfg, ("num_hidden_layers", "n_layer", "num_layers"), config.shadow_num_hidden_layers or 1,
         "shadow_num_hidden_layers")
    for field, names in (("shadow_hidden_size", ("hidden_size", "n_embd", "d_model")),
                         ("shadow_intermediate_size", ("intermediate_size", "ffn_dim", "n_inner")),
                         ("shadow_num_attention_heads", ("num_attention_heads", "n_head", "num_heads"))):
        if getattr(config, field) is not None:
            _set(cfg, names, getattr(config, field), field)
    n = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None)  # per-layer lists sized for the base depth (Qwen3)
    if types is not None:
        types = list(types) or ["full_attention"]
        cfg.layer_types = (types[:n] + [types[-1]] * max(0, n - len(types)))[:n]
    window = getattr(cfg, "max_window_layers", None)
    if isinstance(window, int) and window > n:
        cfg.max_window_layers = n
    return cfg


def _load_pretrained(source: str) -> tuple[nn.Module, nn.Linear | None]:
    """A backbone from a local folder, and its projection when the checkpoint is a projected one."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    with open(os.path.join(source, "config.json"), encoding="utf-8") as fh:
        raw = json.load(fh)
    if raw.get("model_type") != "causal_lm_with_hidden_projection":
        return AutoModel.from_pretrained(source), None
    inner = dict(raw["shadow_model_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
    weights = load_file(os.path.join(source, "model.safetensors"))
    backbone.load_state_dict({k[len("shadow_model."):]: v for k, v in weights.items()
                              if k.startswith("shadow_model.")}, strict=True)
    weight = weights.get("shadow_hidden_projection.weight")
    if weight is None:
        raise ValueError(f"ShadowConfig.shadow_model: {source!r} is a projected shadow checkpoint without "
                         "'shadow_hidden_projection.weight'")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    projection.weight.data = weight.to(projection.weight.dtype)
    return backbone, projection


class ShadowNetwork(nn.Module):
    """Backbone + projection (+ sequence-classification head): ``s^(0) = P(backbone(x))``."""

    def __init__(self, model: nn.Module, config: ShadowConfig) -> None:
        super().__init__()
        _, base_backbone, _ = find_backbone(model)
        d = hidden_size(model.config)
        projection = None
        if config.shadow_model == "mirror":
            backbone = type(base_backbone)(mirror_config(base_backbone, config))
        else:
            backbone, projection = _load_pretrained(config.shadow_model)
        shadow_d = hidden_size(backbone.config)
        if projection is not None and (projection.in_features, projection.out_features) != (shadow_d, d):
            raise ValueError(f"ShadowConfig.shadow_model: the loaded projection maps {projection.in_features}->"
                             f"{projection.out_features}, the shadow / base widths are {shadow_d}/{d}")
        if projection is None:
            projection = nn.Linear(shadow_d, d, bias=False) if shadow_d != d else nn.Identity()
        try:
            params = inspect.signature(backbone.forward).parameters
        except (TypeError, ValueError):
            params = {}
        takes_embeds = "inputs_embeds" in params
        self.cache_key = "cache" if "cache" in params else "past_key_values"  # transformers 5 names it cache
        self.share = bool(config.share_embeddings and config.shadow_model == "mirror" and takes_embeds
                          and shadow_d == d)
        if self.share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens  # fed the frozen base embeddings instead (peft drops only this name)
        self.backbone = backbone
        self.projection = projection
        self.head_is_lm = task(config) == "CAUSAL_LM"
        head = None
        if task(config) == "SEQ_CLS":
            head = next((copy.deepcopy(m) for m in (getattr(model, a, None) for a in ("score", "classifier"))
                         if isinstance(m, nn.Module)), None)
        self.head = head
        self.pretrained = config.shadow_model != "mirror"
        ref = next(model.parameters(), None)
        if ref is not None:
            self.to(device=ref.device, dtype=ref.dtype)

    def requires_grad_(self, requires_grad: bool = True) -> "ShadowNetwork":
        super().requires_grad_(requires_grad)
        if self.pretrained:  # a pretrained backbone's embedding tables stay frozen (peft)
            for getter in ("get_input_embeddings", "get_output_embeddings"):
                embed = None
                with contextlib.suppress(Exception):
                    embed = getattr(self.backbone, getter)()
                if isinstance(embed, nn.Module):
                    embed.requires_grad_(False)
        return self

    def seed(self, embed: nn.Module, input_ids: Tensor | None, inputs_embeds: Tensor | None,
             attention_mask: Tensor | None, position_ids: Tensor | None, cache: Any, use_cache: bool
             ) -> tuple[Tensor, Any]:
        """``s^(0)`` (batch, seq, d) and the backbone's cache after this call."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": use_cache, "return_dict": True,
                                  self.cache_key: cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.share and inputs_embeds is None:
            if input_ids is None:
                raise ValueError("ShadowPEFT: either input_ids or inputs_embeds must be given")
            inputs_embeds = embed(input_ids)
        if inputs_embeds is not None:
            out = self.backbone(inputs_embeds=inputs_embeds, **kwargs)
        else:
            out = self.backbone(input_ids=input_ids, **kwargs)
        state = getattr(out, "last_hidden_state", None)
        if state is None:
            raise TypeError(f"ShadowPEFT: the shadow backbone {type(self.backbone).__name__} returned no "
                            "last_hidden_state")
        new_cache = out.get("cache", out.get("past_key_values")) if isinstance(out, dict) else None
        return self.projection(state), new_cache
