"""peft's PeftModel methods around the core (activation switches, status reports, the model card, the Hub),
mixed into :class:`peftkit.model.PeftModel`, which keeps adapters, merging and files."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ._version import __version__
from .io import atomic_write_text
from .model_card import CARD_NAME, update_model_card
from .registry import get_method
from .status import get_layer_status as _layer_status
from .status import get_model_status as _model_status


class PeftModelAPI:
    """Mixed into PeftModel (``self.base_model`` is the tuner, ``self.peft_config`` its configs)."""

    base_model: Any
    peft_config: dict

    # -- adapters on and off --------------------------------------------------------------------------
    def disable_adapter_layers(self) -> None:
        """Switch every adapter off in place (the model computes as its base) until ``enable_adapter_layers``."""
        self.base_model.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether an active adapter acts: adapters are neither switched off nor all inactive."""
        disabled = any(layer.disable_adapters for _, layer in self.base_model.adapter_layers())
        return bool(self.base_model.active_adapters) and not disabled

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules trained in full by any adapter (peft's attribute), or None."""
        names = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
        return names or None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapter is a weight delta ``W' = W0 + dW`` (mergeable, not prompt learning), so that its
        layers can be approximated by LoRA factors."""
        config = self.peft_config[adapter_name]
        return not config.is_prompt_learning and get_method(config).mergeable

    # -- reports --------------------------------------------------------------------------------------
    def get_layer_status(self) -> list:
        return _layer_status(self)

    def get_model_status(self) -> Any:
        return _model_status(self)

    # -- model card and the Hub -----------------------------------------------------------------------
    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write or update ``output_dir/README.md`` (peft's card metadata; see model_card.py)."""
        folder = os.fspath(output_dir)
        causal = type(self).__name__ == "PeftModelForCausalLM"
        text = update_model_card(self, folder, __version__, causal)
        atomic_write_text(os.path.join(folder, CARD_NAME), text)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, **save_kwargs: Any) -> Any:
        """Save the adapters into a temporary folder and upload it to ``repo_id`` on the Hugging Face Hub."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import OfflineModeIsEnabled

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                         commit_message=commit_message or "Upload adapter")
            except OfflineModeIsEnabled as err:
                raise RuntimeError(
                    f"push_to_hub({repo_id!r}): the Hugging Face Hub is switched off here (HF_HUB_OFFLINE); "
                    "save_pretrained(folder) and upload the folder where the Hub is reachable"
                ) from err
