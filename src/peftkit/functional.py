"""Adapters on a model without the PeftModel wrapper, and adapter state dicts (peft's functional API).

``inject_adapter_in_model`` attaches adapters in place and records the config in ``model.peft_config``, as
peft does; diffusers' and transformers' ``add_adapter`` / ``load_lora_adapter`` build on it. The state-dict
functions accept a PeftModel (keys ``base_model.model.<path>...``) or such a model (keys ``<path>...``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import PeftConfig
from .registry import get_method
from .tuner import TunerModel


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Attach adapter layers to ``model`` in place, without a PeftModel wrapper; returns ``model``.

    As in PEFT, the config is recorded in ``model.peft_config[adapter_name]``, and the state-dict functions
    below accept the model itself. Not for methods whose layers share adapter-level tensors (VeRA): those
    live on a tuner that this function does not keep (PEFT refuses them too).
    """
    if get_method(peft_config).adapter_cls.uses_shared_state:
        raise ValueError(
            f"inject_adapter_in_model does not support {peft_config.peft_type}: its layers share tensors kept "
            "on the tuner; use get_peft_model instead"
        )
    tuner = TunerModel.over(model)
    init = state_dict is None and not low_cpu_mem_usage  # low_cpu_mem_usage: on the meta device until loaded
    tuner.inject(peft_config, adapter_name, init=init, meta=low_cpu_mem_usage)
    if state_dict is not None:
        try:
            ckpt.load_state(tuner, adapter_name, {_with_prefix(k): v for k, v in state_dict.items()}, "state_dict")
        except BaseException:
            tuner.delete(adapter_name)
            raise
    return model


def _with_prefix(key: str) -> str:
    return key if key.startswith(ckpt.PREFIX) else ckpt.PREFIX + key


def tuner_of(model: nn.Module) -> TunerModel:
    """The tuner of a PeftModel, a TunerModel itself, or one over a model with adapters injected in place."""
    if isinstance(getattr(model, "base_model", None), TunerModel):  # a PeftModel
        return model.base_model
    if isinstance(model, TunerModel):
        return model
    if isinstance(getattr(model, "peft_config", None), dict) and model.peft_config:
        return TunerModel.over(model)
    raise TypeError(
        f"expected a PeftModel or a model with adapters injected by inject_adapter_in_model, got {type(model).__name__}"
    )


def _bare(model: nn.Module) -> bool:
    """Adapters injected in place: file keys are relative to the model, without ``base_model.model.``."""
    return not isinstance(model, TunerModel) and not isinstance(getattr(model, "base_model", None), TunerModel)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors under Hugging Face PEFT's key names (adapter name removed). ``save_embedding_layers``
    (True, False or peft's "auto"): the base input embedding and output layer too (``ckpt.saved_embeddings``)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner = tuner_of(model)
    state = {**ckpt.state_dict_for_save(tuner, adapter_name),
             **ckpt.saved_embeddings(tuner, adapter_name, save_embedding_layers)}
    if _bare(model):
        state = {k.removeprefix(ckpt.PREFIX): v for k, v in state.items()}
    return state


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> ckpt.LoadResult:
    """Load PEFT-layout tensors into an existing adapter: validated in full first, then copied. Tensors on the
    meta device (adapters built with ``low_cpu_mem_usage``) take the given ones whatever the flag.
    ``ignore_mismatched_sizes``: tensors whose shape differs from the model's are skipped with a warning."""
    state = peft_model_state_dict
    if _bare(model):
        state = {_with_prefix(k): v for k, v in state.items()}
    ckpt.load_state(tuner_of(model), adapter_name, state, ignore_mismatched_sizes=ignore_mismatched_sizes)
    return ckpt.LoadResult([], [])
