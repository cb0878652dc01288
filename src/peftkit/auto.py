"""AutoPeftModel classes: load the base model an adapter names, then the adapter (peft's ``peft/auto.py``).

``AutoPeftModelForCausalLM.from_pretrained(adapter_folder)`` reads ``adapter_config.json``, loads the base
model at ``base_model_name_or_path`` with the matching transformers Auto class (keyword arguments such as
``torch_dtype`` go to it), grows the input embeddings when the adapter folder holds a tokenizer with a
larger vocabulary, and returns ``PeftModelForCausalLM.from_pretrained(base, adapter_folder, ...)``.

As everywhere in peftkit, folders are local: a ``base_model_name_or_path`` that is not a folder on this
machine raises ``FileNotFoundError`` (peft would download it from the Hugging Face Hub).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

from torch import nn

from .config import PeftConfig
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
]

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# task type -> the PeftModel subclass that serves it (keys are TaskType values, as in peft)
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_default_import_allowlist() -> list[str]:
    """Packages an adapter config's ``auto_mapping`` may name (peft's default list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist: list[str], parent_name: str) -> bool:
    """True when ``parent_name`` is in ``allowlist`` or inside one of its packages (``transformers.x``)."""
    if parent_name in allowlist:
        return True
    return any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


class _BaseAutoPeftModel:
    """Shared ``from_pretrained``; subclasses name a transformers Auto class and a PeftModel class."""

    _target_class_name: ClassVar[str | None] = None  # attribute of ``transformers``, resolved when loading
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{self.__class__.__name__} is designed to be instantiated "
            f"using the `{self.__class__.__name__}.from_pretrained(pretrained_model_name_or_path)` or "
            f"`{self.__class__.__name__}.from_config(config)` methods."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter; returns the PeftModel.

        Parameters are those of ``PeftModel.from_pretrained``. ``kwargs`` go to the base model's
        ``from_pretrained`` (``torch_dtype``, ``device_map``, ...) and to ``PeftModel.from_pretrained``
        (``subfolder``: both, as in peft). ``import_allowlist`` limits the packages an ``auto_mapping``
        (adapters saved without a task type) may import; default ``get_default_import_allowlist()``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        peft_config = PeftConfig.from_pretrained(path, subfolder=kwargs.get("subfolder"))
        target_class = cls._base_class(peft_config, import_allowlist)
        base_path = peft_config.base_model_name_or_path
        if not base_path or not os.path.isdir(base_path):
            raise FileNotFoundError(
                f"{path}: the adapter's base model {base_path!r} is not a local folder (peftkit loads from local "
                "folders only); load the base model yourself and use PeftModel.from_pretrained(model, folder)"
            )
        base_model = target_class.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        _resize_for_tokenizer(base_model, path, revision, kwargs)
        return cls._target_peft_class.from_pretrained(
            base_model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
            revision=revision, **kwargs,
        )

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, import_allowlist: list[str] | None) -> Any:
        """The class whose ``from_pretrained`` loads the base model (peft's rules and error messages)."""
        task_type = getattr(peft_config, "task_type", None)
        task_type = getattr(task_type, "value", task_type)
        if cls._target_class_name is None and task_type is not None:
            raise ValueError(
                "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                "(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
            )
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
            if cls._target_peft_class.__name__ != expected.__name__:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    "task type."
                )
            import transformers

            return getattr(transformers, cls._target_class_name)
        auto_mapping = getattr(peft_config, "auto_mapping", None)
        if auto_mapping is None:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading the correct "
                "model for your task type."
            )
        allowlist = get_default_import_allowlist() if import_allowlist is None else import_allowlist
        parent_name = auto_mapping["parent_library"]
        if not check_import_allowlist(allowlist, parent_name):
            raise ValueError(
                f"The auto mapping wants to import '{parent_name}' which is not in the import allowlist. "
                "If you are sure that importing this library is safe, specify "
                f"`import_allowlist=['{parent_name}']` in `from_pretrained()`."
            )
        return getattr(importlib.import_module(parent_name), auto_mapping["base_model_class"])


def _resize_for_tokenizer(base_model: nn.Module, path: str, revision: str | None, kwargs: dict[str, Any]) -> None:
    """Grow the input embeddings to the adapter folder's tokenizer when it has more tokens (never shrink)."""
    if not os.path.exists(os.path.join(path, TOKENIZER_CONFIG_NAME)):
        return
    if not hasattr(base_model, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    token = kwargs.get("token", kwargs.get("use_auth_token"))
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=revision, token=token, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Adapters saved without a task type: the base class comes from the config's ``auto_mapping``."""

    _target_class_name = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    """``AutoModelForCausalLM`` + ``PeftModelForCausalLM``."""

    _target_class_name = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    """``AutoModelForSeq2SeqLM`` + ``PeftModelForSeq2SeqLM``."""

    _target_class_name = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    """``AutoModelForSequenceClassification`` + ``PeftModelForSequenceClassification``."""

    _target_class_name = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    """``AutoModelForTokenClassification`` + ``PeftModelForTokenClassification``."""

    _target_class_name = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    """``AutoModelForQuestionAnswering`` + ``PeftModelForQuestionAnswering``."""

    _target_class_name = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    """``AutoModel`` + ``PeftModelForFeatureExtraction``."""

    _target_class_name = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
