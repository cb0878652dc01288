"""Zero-shot-style classification with a CLIP model through whatever adapters are active.

    logits = logit_scale.exp() * cos(f_img, w_c)                                     (CLIP, Radford et al. 2021)

``f_img`` (B, D) is the projected image feature (``get_image_features``, so VPT or CLIP-Adapter act on it),
``w_c`` (N, D) the text feature of class c's prompt. With an active CoOp adapter the prompt is
[SOS][V]_1..[V]_M[CLASS][.][EOS] with the learned context in place of M placeholder tokens (CoOp's own code
does it the same way); CoCoOp conditions each image's prompts on it, so ``w`` becomes (B, N, D); an active
Tip-Adapter adds its cache term ``alpha * exp(-beta (1 - f F^T)) L``.

The adapters ``classify`` consults subclass the two classes here, ``ClassPrompts`` (CoOp / CoCoOp, ``coop``) and
``LogitCache`` (Tip-Adapter, ``tip_adapter``): those modules import this one, never the other way round.

Class names are strings (a ``tokenizer``, any callable like a transformers tokenizer, is then needed) or
token ids of each name without special tokens (the start / end ids come from the text config).
``classify`` (and ``build_cache``) are bound onto the CLIP model when CoOp, CoCoOp or Tip-Adapter is attached,
so ``peft_model.classify(...)`` works; ``set_tokenizer`` stores a default tokenizer for it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import Adapter, AdapterLayer
from ...tuner import TunerModel

PLACEHOLDER = "X"  # CoOp's placeholder word for the context slots


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel / TunerModel (or the model itself)."""
    if isinstance(model, TunerModel):
        return model.model
    if isinstance(getattr(model, "base_model", None), TunerModel):  # a PeftModel
        return model.base_model.model
    return model


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "text_config", cfg)


def pooling_problem(model: nn.Module) -> str | None:
    """Why the text tower cannot pool a prompt at its end token (None when it can)."""
    cfg = text_config(model)
    eos, vocab = getattr(cfg, "eos_token_id", None), getattr(cfg, "vocab_size", None)
    if eos == 2 or eos is None and vocab is None:  # legacy CLIP configs pool at the highest id (argmax)
        return None
    if eos is None or vocab is None or not 0 <= eos < vocab:
        return (f"text_config.eos_token_id {eos} is outside the vocabulary (size {vocab}), so the text encoder "
                "pools position 0 (the start token), which the causal mask keeps from ever seeing the learned "
                "context or the class name")
    return None


def bind_api(model: nn.Module) -> None:
    """Make ``classify`` / ``build_cache`` reachable from the PeftModel (attribute reads fall through to the
    base model) by binding them onto a CLIP-like model that has no such attributes of its own. Only the
    methods whose logits need their own classifier (CoOp, CoCoOp, Tip-Adapter) bind them; CLIP-Adapter acts
    in the plain forward (the module-level ``classify`` works for it as for any CLIP)."""
    if not hasattr(model, "get_image_features"):
        return
    for name, fn in (("classify", classify), ("build_cache", build_cache)):
        if name in vars(model) or not hasattr(model, name):
            object.__setattr__(model, name, functools.partial(fn, model))


def set_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """The tokenizer ``classify`` uses when called without one (e.g. ``model.classify(pixels, names)``)."""
    object.__setattr__(unwrap(model), "_peftkit_tokenizer", tokenizer)


def _pooled(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


def encode_images(model: nn.Module, images: Any, processor: Any = None) -> Tensor:
    """L2-normalised projected image features (B, D); ``images`` are pixel values or, with a processor, images."""
    if not isinstance(images, Tensor):
        if processor is None:
            raise TypeError("images: pass pixel values (B, 3, H, W) or give a processor to turn images into them")
        images = processor(images=images, return_tensors="pt")["pixel_values"]
    ref = next(model.parameters())
    feats = _pooled(model.get_image_features(pixel_values=images.to(ref.device, ref.dtype)))
    return F.normalize(feats, dim=-1)


def encode_texts(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """L2-normalised projected text features (T, D) of tokenized prompts."""
    dev = next(model.parameters()).device
    return F.normalize(_pooled(model.get_text_features(input_ids=ids.to(dev), attention_mask=mask.to(dev))), dim=-1)


def prompt_ids(
    model: nn.Module,
    class_names: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Any = None,
    n_ctx: int = 0,
    template: str = "a photo of a {}.",
) -> tuple[Tensor, Tensor]:
    """Token ids (N, L) and attention mask of one prompt per class.

    ``n_ctx`` > 0 (CoOp): "X X ... X <name>." with n_ctx placeholders right after the start token, which the
    context replaces. ``n_ctx`` = 0: the zero-shot ``template``. Token-id class names get
    [bos] + placeholders + ids + [eos] (no template), padded with eos (the text tower pools the first eos).
    """
    if len(class_names) == 0:
        raise ValueError("class_names: expected at least one class")
    if isinstance(class_names[0], str):
        if tokenizer is None:
            raise TypeError("class_names are strings: pass tokenizer= (or call set_tokenizer(model, tokenizer) "
                            "once, or give the token ids of each class name)")
        texts = [" ".join([PLACEHOLDER] * n_ctx + [f"{n}."]) if n_ctx else template.format(n) for n in class_names]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids = torch.as_tensor(enc["input_ids"])
        mask = torch.as_tensor(enc["attention_mask"]) if "attention_mask" in enc else torch.ones_like(ids)
        if n_ctx and not (ids[:, 1:1 + n_ctx] == ids[:1, 1:2]).all():
            raise ValueError(f"tokenizer: {PLACEHOLDER!r} must be one token right after the start token, so the "
                             f"{n_ctx} context vectors have slots 1..{n_ctx}; got ids {ids[0, :1 + n_ctx].tolist()}")
        return ids, mask
    cfg = text_config(model)
    bos, eos = getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None)
    if bos is None or eos is None:
        raise ValueError("class_names as token ids need text_config.bos_token_id and eos_token_id")
    rows = [[bos] + [bos] * n_ctx + [int(t) for t in name] + [eos] for name in class_names]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


class ClassPrompts(Adapter):
    """An adapter that gives ``classify`` its class logits from learned prompt context (CoOp, CoCoOp)."""

    n_ctx: int  # context slots in each class prompt (``prompt_ids(n_ctx=...)``)

    def class_logits(self, clip: nn.Module, f: Tensor, ids: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
        """Logits (B, N) of the normalised image features ``f`` (B, D) over the class prompts ``ids`` / ``mask``."""
        raise NotImplementedError


class LogitCache(Adapter):
    """An adapter that adds a term to ``classify``'s logits and is filled by ``build_cache`` (Tip-Adapter)."""

    def cache_logits(self, f: Tensor, num_classes: int) -> Tensor:
        """The term (B, N) added to the logits of the normalised image features ``f`` (B, D)."""
        raise NotImplementedError

    def set_cache(self, feats: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
        raise NotImplementedError


def active(model: nn.Module, cls: type) -> list[tuple[AdapterLayer, nn.Module]]:
    """(layer, adapter) for the active, unmerged, enabled adapters of type ``cls`` in ``model``."""
    out = []
    for layer in model.modules():
        if isinstance(layer, AdapterLayer) and not layer.disable_adapters:
            for name in layer.active_adapters:
                adapter = layer.adapters[name]
                if isinstance(adapter, cls) and name not in layer.merged_adapters:
                    out.append((layer, adapter))
    return out


def classify(
    model: nn.Module,
    images: Any,
    class_names: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Any = None,
    processor: Any = None,
    template: str = "a photo of a {}.",
) -> Tensor:
    """Class logits (B, N) of ``images`` over ``class_names``: logit_scale.exp() * cosine, plus the cache term
    of an active Tip-Adapter. Works on a plain CLIPModel (zero-shot CLIP) and through any active adapters."""
    clip = unwrap(model)
    tokenizer = tokenizer if tokenizer is not None else vars(clip).get("_peftkit_tokenizer")
    f = encode_images(clip, images, processor)  # (B, D)
    scale = clip.logit_scale.exp()
    coop = active(clip, ClassPrompts)
    if len(coop) > 1:
        raise ValueError("classify: more than one active CoOp / CoCoOp adapter; activate one (set_adapter)")
    if coop:
        ids, mask = prompt_ids(clip, class_names, tokenizer, n_ctx=coop[0][1].n_ctx)
        logits = coop[0][1].class_logits(clip, f, ids, mask, scale)
    else:
        ids, mask = prompt_ids(clip, class_names, tokenizer, template=template)
        logits = scale * f @ encode_texts(clip, ids, mask).t()
    for _, tip in active(clip, LogitCache):
        logits = logits + tip.cache_logits(f, len(class_names))
    return logits


@torch.no_grad()
def build_cache(
    model: nn.Module, images: Any, labels: Tensor, num_classes: int | None = None, processor: Any = None,
    adapter_name: str | None = None,
) -> None:
    """Fill the Tip-Adapter cache: keys F = normalised image features of the few-shot ``images`` (N*K, D),
    values L = one-hot ``labels`` (N*K, N). Build the optimizer afterwards (Tip-Adapter-F trains F)."""
    clip = unwrap(model)
    tips = [a for layer in clip.modules() if isinstance(layer, AdapterLayer)
            for n, a in layer.adapters.items() if isinstance(a, LogitCache) and adapter_name in (None, n)]
    if len(tips) != 1:
        raise ValueError(f"build_cache: expected one Tip-Adapter (adapter_name={adapter_name!r}), found {len(tips)}")
    feats = encode_images(clip, images, processor)  # the same features classify compares with the keys
    tips[0].set_cache(feats, torch.as_tensor(labels), num_classes)
