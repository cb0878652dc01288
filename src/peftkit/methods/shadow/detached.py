"""The standalone shadow network: ``unload_shadow()`` and ``DetachedShadowModel`` (peft's).

``head(projection(backbone(x)))`` without the base model (the per-block updates need the base outputs and do
not exist alone): a causal LM through the base LM head (``generate`` and the KV cache work), or a classifier
on the last non-padding token. With ``copy=False`` (the default) the modules are shared with the adapted
model; a backbone fed the base embeddings then reaches them through a reference that is not a submodule (a
``save_pretrained`` of it lacks the table), while ``copy=True`` attaches a private copy as ``embed_tokens``.
"""

from __future__ import annotations

import copy as _copy
from typing import Any

from torch import Tensor, nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from . import functional as SF
from .network import task
from .wrapper import ShadowLayer


class DetachedShadowModel(PreTrainedModel, GenerationMixin):
    """A shadow backbone with its projection and head, detached from the base model."""

    main_input_name = "input_ids"
    base_model_prefix = "backbone"
    _supports_cache_class = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _causal_lm_only_kwargs = ("logits_to_keep", "num_logits_to_keep")

    def __init__(self, backbone: PreTrainedModel, projection: nn.Module | None = None, head: nn.Module | None = None,
                 is_classification: bool = False, input_embeddings: nn.Module | None = None) -> None:
        super().__init__(backbone.config)
        self.backbone = backbone
        self.shadow_hidden_projection = projection if projection is not None else nn.Identity()
        self.head = head
        self.is_classification = is_classification
        self._shared_input_embeddings: list[nn.Module | None] = [input_embeddings]  # not a submodule
        gen = getattr(backbone, "generation_config", None)
        self.generation_config = gen if gen is not None else GenerationConfig.from_model_config(self.config)

    def can_generate(self) -> bool:
        return getattr(self, "head", None) is not None and not getattr(self, "is_classification", False)

    def get_input_embeddings(self) -> nn.Module:
        shared = self._shared_input_embeddings[0]
        return shared if shared is not None else self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self._shared_input_embeddings[0] is not None:
            self._shared_input_embeddings[0] = value
        else:
            self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return None if getattr(self, "is_classification", False) else self.head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> Any:
        for key in self._causal_lm_only_kwargs:
            kwargs.pop(key, None)
        kwargs["return_dict"] = True
        if self._shared_input_embeddings[0] is not None and kwargs.get("inputs_embeds") is None:
            if input_ids is None:
                raise ValueError("Either `input_ids` or `inputs_embeds` must be provided.")
            kwargs["inputs_embeds"] = self.get_input_embeddings()(input_ids)
            input_ids = None
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.shadow_hidden_projection(out.last_hidden_state)
        if self.head is None:
            return hidden
        if self.is_classification:
            logits = self.head(SF.pool_last_token(hidden, attention_mask))
            loss = None if labels is None else SF.sequence_classification_loss(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        logits = self.head(hidden)
        loss = None if labels is None else SF.shifted_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.get("cache", out.get("past_key_values")))


def unload_shadow(model: nn.Module, adapter_name: str | None = None, copy: bool = False) -> DetachedShadowModel:
    """The shadow network of ``adapter_name`` (default: the active one) of the adapted ``model`` as a standalone
    model (peft's ``ShadowModel.unload_shadow``); ``copy=True`` deep-copies it (and the shared embeddings)."""
    entries: dict[str, Any] = {}
    active: list[str] = []
    for layer in model.modules():
        if isinstance(layer, ShadowLayer):
            active += [n for n in layer.active_adapters if n not in active]
            for name, adapter in layer.adapters.items():
                if getattr(adapter, "network", None) is not None:
                    entries.setdefault(name, adapter)
    name = adapter_name if adapter_name is not None else (active[0] if active else None)
    if name not in entries:
        raise ValueError(f"No shadow backbone found for adapter '{name}'.")
    entry = entries[name]
    network = entry.network
    if getattr(network, "from_block", False):
        raise NotImplementedError("`unload_shadow()` is not supported for Diffusers models because a standalone "
                                  "denoiser requires architecture-specific reconstruction.")
    dup = _copy.deepcopy if copy else (lambda m: m)
    backbone, projection = dup(network.backbone), dup(network.projection)
    head = network.head if network.head is not None else (
        model.get_output_embeddings() if network.head_is_lm else None)
    head = dup(head) if head is not None else None
    shared = None
    if network.share:
        embeds = model.get_input_embeddings()
        if copy:
            backbone.embed_tokens = _copy.deepcopy(embeds)
        else:
            shared = embeds
    return DetachedShadowModel(backbone, projection, head, is_classification=task(entry.config) == "SEQ_CLS",
                               input_embeddings=shared)
