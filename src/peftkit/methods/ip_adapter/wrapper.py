"""``IPAdapterLayer``: a cross-attention module with IP-Adapter adapters, and the call's image prompt.

The image prompt arrives with the ``PeftModel`` call (``IPAdapterAdapter.call_context``), which projects it once,
before the base model runs: each adapter's image tokens ``c_i = LayerNorm(W embeds + b)`` (diffusers'
``ImageProjection``; SD3: the resampler's tokens and timestep embedding). The tokens travel to the layers with the
call's own arguments, as diffusers' SD3 passes its ``ip_hidden_states``: an ``ImagePrompt`` under
``ip_hidden_states`` in ``cross_attention_kwargs`` (UNet) or ``joint_attention_kwargs`` (SD3), which diffusers hands
to every block and attention (``Attention`` passes over that name quietly where its processor does not take it).
A gradient-checkpointed block keeps its arguments for the recomputation in backward, so the recomputed attention
sees the same image tokens, and concurrent calls (request threads share the layers) each carry their own.

A base model whose forward takes neither argument, and a layer called directly, read the image prompt from
``image_prompt_scope`` instead (thread-local, for the duration of the call; projected on first use), which
gradient checkpointing cannot see: the call refuses it then (``call_context``).

The layer runs diffusers' ``IPAdapterAttnProcessor2_0`` on its base ``Attention`` in place of the base's processor:
``attn(q, K_text, V_text) + sum_i scale_i attn(q, to_k_ip_i(c_i), to_v_ip_i(c_i))`` over the active adapters that
have an image prompt and a nonzero scale. With none (no image prompt, scale 0, adapters disabled) the base module
runs as it is, so the output is the base model's bit for bit. On SD3's joint attention the adapter's
``SD3IPAdapterJointAttnProcessor2_0`` runs instead, with the resampler's tokens and timestep embedding (``sd3.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ...layers import AdapterLayer, adapter_layers

PROMPT_KEY = "ip_hidden_states"  # the attention-kwargs entry that carries an ImagePrompt (diffusers' SD3 name)


@dataclass(frozen=True)
class ImagePrompt:
    """One call's image tokens by adapter name: (B, N_images, num_tokens, c) each; SD3: (tokens (B, num_tokens, d),
    timestep embedding (B, resampler_dim))."""

    tokens: dict[str, Any]


def project_prompts(model: nn.Module, embeds: dict[str, Tensor], timestep: Tensor | None) -> ImagePrompt:
    """``embeds`` (adapter name -> (B, N, D)) projected once by each adapter's image projection, for the adapters that
    some layer runs (active, enabled, nonzero scale): the others' image branches add nothing."""
    adapters: dict[str, Any] = {}
    for _, layer in adapter_layers(model):
        if isinstance(layer, IPAdapterLayer) and not layer.disable_adapters:
            for name in embeds:
                adapter = layer.adapters[name] if name in layer.adapters else None
                if adapter is not None and name in layer.active_adapters and adapter.scale != 0:
                    adapters.setdefault(name, adapter)
    return ImagePrompt({n: a.project(embeds[n], timestep) for n, a in adapters.items()})


class _Local(threading.local):
    embeds: dict[str, Tensor] | None = None  # this thread's call: adapter name -> (B, N, D) image embeddings
    tokens: dict[str, Any] | None = None  # adapter name -> (B, N, num_tokens, cross_attention_dim), on first use
    timestep: Tensor | None = None  # the call's timestep (SD3's image projection reads it)


_LOCAL = _Local()


@contextlib.contextmanager
def image_prompt_scope(embeds: dict[str, Tensor], timestep: Tensor | None = None) -> Iterator[None]:
    """Within the block, and only in this thread, IP-Adapter layers read ``embeds`` (adapter name -> (B, N, D)) and
    the call's ``timestep``."""
    outer = (_LOCAL.embeds, _LOCAL.tokens, _LOCAL.timestep)
    _LOCAL.embeds, _LOCAL.tokens, _LOCAL.timestep = embeds, {}, timestep
    try:
        yield
    finally:
        _LOCAL.embeds, _LOCAL.tokens, _LOCAL.timestep = outer


def call_embeds() -> dict[str, Tensor]:
    """The running call's image prompts by adapter name (empty outside a call that has one)."""
    return _LOCAL.embeds or {}


def image_tokens(name: str, adapter: Any) -> Any:
    """Adapter ``name``'s image tokens for the running call (SD3: tokens and timestep embedding), projected once and
    then reused by every layer."""
    tokens = _LOCAL.tokens
    if name not in tokens:
        tokens[name] = adapter.project(_LOCAL.embeds[name], _LOCAL.timestep)
    return tokens[name]


def _check_grad_mode(prompt: ImagePrompt, names: list[str]) -> None:
    """ValueError when image tokens that record gradients reach a layer running without them: reentrant gradient
    checkpointing (``use_reentrant=True``) runs its blocks so, and in backward would send every block's gradient through
    the one projection graph (which the first block's backward frees) since only the blocks' tensor arguments are
    detached and re-attached."""
    if torch.is_grad_enabled():
        return
    parts = [prompt.tokens[n] for n in names]
    parts = [t for p in parts for t in (p if isinstance(p, tuple) else (p,))]
    if any(isinstance(t, Tensor) and t.requires_grad for t in parts):
        raise ValueError("IP-Adapter: the image tokens record gradients but this attention runs without them: "
                         "reentrant gradient checkpointing (use_reentrant=True) cannot carry them into its "
                         "recomputation; use diffusers' default enable_gradient_checkpointing() (non-reentrant), or "
                         "run the call under torch.no_grad() when no gradients are wanted")


def _processor_kwargs(processor_cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The cross-attention kwargs the IP-Adapter processor takes (as ``Attention.forward`` filters them)."""
    accepted = set(inspect.signature(processor_cls.__call__).parameters)
    return {k: v for k, v in kwargs.items() if k in accepted}


class IPAdapterLayer(AdapterLayer):
    """A diffusers cross-attention ``Attention`` plus IP-Adapter adapters (decoupled cross-attention)."""

    def _prompted(self, prompt: ImagePrompt | None) -> list[str]:
        if self.disable_adapters:
            return []
        embeds = prompt.tokens if prompt is not None else call_embeds()
        return [n for n in self.active_adapters
                if n in self.adapters and n in embeds and self.adapters[n].scale != 0]

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        prompt = kwargs.get(PROMPT_KEY)
        if isinstance(prompt, ImagePrompt):  # the call's image tokens, carried with the block's arguments
            del kwargs[PROMPT_KEY]
        else:
            prompt = None
        names = self._prompted(prompt)

        def tokens(name: str) -> Any:
            return prompt.tokens[name] if prompt is not None else image_tokens(name, self.adapters[name])

        if not names:
            return self.base_layer(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if prompt is not None:
            _check_grad_mode(prompt, names)
        if self.routing is not None:
            raise ValueError("IP-Adapter: adapter_names (per-row routing of a mixed batch) is not supported; give "
                             "each row its image prompt in ip_adapter_image_embeds instead")
        first = self.adapters[names[0]]
        if first.joint:  # SD3's joint attention: one image branch
            if len(names) > 1:
                raise ValueError(f"ip_adapter_image_embeds: SD3's IP-Adapter processor has one image branch; the "
                                 f"IP-Adapter adapters {names} all got an image prompt")
            ip_states, temb = tokens(names[0])
            self._check_rows(names[0], ip_states, hidden_states)
            return first.processor(self.base_layer, hidden_states, encoder_hidden_states, attention_mask,
                                   ip_hidden_states=ip_states, temb=temb)
        if encoder_hidden_states is None:
            raise ValueError("IP-Adapter: the cross-attention got no encoder_hidden_states (the text); IP-Adapter "
                             "adds image keys and values beside the text's")
        if isinstance(encoder_hidden_states, tuple):
            raise ValueError("IP-Adapter: encoder_hidden_states is already a (text, image) pair: the base UNet has "
                             "diffusers' own IP-Adapter loaded; use one or the other")
        adapters = [self.adapters[n] for n in names]
        ip_states = [tokens(n) for n in names]
        for n, s in zip(names, ip_states):
            self._check_rows(n, s, hidden_states)
        processor = adapters[0].processor
        if len(adapters) > 1:  # diffusers' processor reads several IP-Adapters from its lists: theirs, joined
            processor = SimpleNamespace(
                to_k_ip=[a.processor.to_k_ip[0] for a in adapters], to_v_ip=[a.processor.to_v_ip[0] for a in adapters],
                scale=[a.scale for a in adapters], num_tokens=[a.num_tokens for a in adapters])
        call = type(adapters[0].processor).__call__
        return call(processor, self.base_layer, hidden_states, encoder_hidden_states=(encoder_hidden_states, ip_states),
                    attention_mask=attention_mask, **_processor_kwargs(type(adapters[0].processor), kwargs))

    def _check_rows(self, name: str, states: Tensor, hidden_states: Tensor) -> None:
        rows = hidden_states.shape[0]
        if states.shape[0] != rows:
            raise ValueError(f"ip_adapter_image_embeds: adapter {name!r} got {states.shape[0]} image prompts for "
                             f"{rows} batch rows through {type(self.base_layer).__name__}; give one per row")
