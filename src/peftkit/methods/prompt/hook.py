"""Model-level adapters: methods that change a model's *inputs* instead of wrapping a layer.

Prompt tuning, P-tuning and prefix tuning (Lester et al. 2021, Liu et al. 2021, Li & Liang 2021) learn
virtual tokens. Their adapter (a :class:`PromptAdapter`) sits, for bookkeeping, in the ``AdapterLayer`` that
wraps the model's input embedding, so the engine's machinery applies unchanged: named adapters, the active
set, ``disable_adapter``, parameter discovery by type, checkpoint keys, parameter counts. The embedding's own
output is never changed; instead one forward pre-hook on the user's model (installed by the tuner once)
lets the active prompt adapter rewrite the call's keyword arguments:

- input-embedding prompts: ``inputs_embeds = [P; E(input_ids)]``, the attention mask gets ``n`` ones in
  front, given position ids become ``[0..n-1; position_ids + n]``, token-level labels get ``n`` x -100,
  token type ids ``n`` zeros;
- key/value prefixes: a ``transformers`` Cache pre-filled with the prefix, the attention mask extended,
  given position ids shifted by ``n``.

Because the hook sits on the model itself, ``model.generate`` goes through it at every step: the first step
(empty or no cache) injects the virtual tokens; later steps (the cache already holds them) only extend the
mask and shift the positions. Generation with a KV cache therefore equals a no-cache greedy loop over the
adapted forward (Hugging Face PEFT 0.21.2's cached generation does not under transformers 5.x, whose models
take ``cache=`` instead of ``past_key_values=``: PEFT re-injects the prompt at every decoding step).

Key/value prefixes train under activation checkpointing (PEFT 0.21.2 refuses to add prefix tuning to a model
with checkpointing on): the prefix goes in a read-only cache that checkpointed layers may keep, handed for the
call to every layer, including those a backbone passes no cache under checkpointing (GPT-2's); see ``methods.prompt.cache``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ...layers import Adapter, AdapterLayer
from .cache import release_layers
from .inputs import bind_inputs, embed_routed_prompts, input_embeddings, is_encoder_decoder


class PromptAdapter(Adapter):
    """An adapter that acts on the model's inputs (see the module docstring). Hosted on the input embedding.

    Subclasses implement ``rewrite(model, kwargs) -> kwargs`` and ``file_tensors(for_save)`` (checkpoint key ->
    tensor, keys as written in the file, e.g. Hugging Face PEFT's ``prompt_embeddings``). Those that prepend
    virtual tokens to the input embeddings also have ``prompts()`` (the (>= n, d) embeddings): a mixed batch
    (``adapter_names``) routes only adapters that have it.
    """

    changes_output: ClassVar[bool] = False  # the embedding's output is left alone; the work happens in ``rewrite``
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return out

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        install(model)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        uninstall(model)

    def rewrite_encoder(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a call of an encoder-decoder model's encoder (``generate`` calls it directly)."""
        return kwargs

    def delta_weight(self, base: nn.Module) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__}: prompt methods cannot be merged into the base weights")


# -- the hook ----------------------------------------------------------------------------------------------
def active_prompt(model: nn.Module, layer: nn.Module | None = None) -> PromptAdapter | None:
    """The active, enabled prompt adapter of ``model`` (None when there is none); ``layer``: the model's input
    embedding when the caller has it."""
    layer = input_embeddings(model) if layer is None else layer
    if not isinstance(layer, AdapterLayer) or layer.disable_adapters:
        return None
    found = None
    for name in layer.active_adapters:
        adapter = layer.adapters[name]
        if isinstance(adapter, PromptAdapter):
            if found is not None:
                active = [n for n in layer.active_adapters if isinstance(layer.adapters[n], PromptAdapter)]
                raise ValueError(f"only one prompt adapter can be active at a time; active: {active}")
            found = adapter
    return found


def routed_prompts(model: nn.Module) -> list[Tensor | None] | None:
    """Per batch row, the prompt (n_i, d) of the row's adapter in a routed call (``adapter_names``), None
    for a row without one; None when the call is not routed or no row uses a prompt adapter."""
    layer = input_embeddings(model)
    if not isinstance(layer, AdapterLayer) or layer.disable_adapters or layer.routing is None:
        return None
    used = {n: layer.adapters[n] for n in layer.routing if n in layer.adapters}
    if not any(isinstance(a, PromptAdapter) for a in used.values()):
        return None
    if is_encoder_decoder(model) or not all(hasattr(a, "prompts") for a in used.values()):
        raise NotImplementedError("adapter_names (per-row routing) with prompt methods: only input-embedding "
                                  "prompts (prompt_tuning, p_tuning) on decoder-only or encoder-only models")
    return [used[n].prompts()[: used[n].num_virtual_tokens] if n in used else None for n in layer.routing]


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    layer = input_embeddings(module)
    if getattr(layer, "routing", None) is not None:  # a mixed batch: the rows' adapters decide, not the active one
        rows = routed_prompts(module)
        return None if rows is None else ((), embed_routed_prompts(module, bind_inputs(module, args, kwargs), rows))
    adapter = active_prompt(module, layer)
    if adapter is None:
        return None
    return (), adapter.rewrite(module, bind_inputs(module, args, kwargs))


def _post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    release_layers(module)  # also after an exception (always_call)


def install(model: nn.Module) -> None:
    """Install the input-rewriting hooks on ``model`` and, for encoder-decoder models, on its encoder
    (``generate`` runs the encoder on its own) (idempotent)."""
    if getattr(model, "_peftkit_prompt_hook", None) is not None:
        return
    handles = [model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               model.register_forward_hook(_post_hook, always_call=True)]
    encoder = model.get_encoder() if is_encoder_decoder(model) and hasattr(model, "get_encoder") else None
    if isinstance(encoder, nn.Module):
        def encoder_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            adapter = active_prompt(model)
            if adapter is None:
                return None
            return (), adapter.rewrite_encoder(model, bind_inputs(module, args, kwargs))

        handles.append(encoder.register_forward_pre_hook(encoder_hook, with_kwargs=True))
    model._peftkit_prompt_hook = handles


def uninstall(model: nn.Module) -> None:
    for handle in getattr(model, "_peftkit_prompt_hook", None) or ():
        handle.remove()
    if hasattr(model, "_peftkit_prompt_hook"):
        del model._peftkit_prompt_hook
