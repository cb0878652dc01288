"""PeftModel: the user-facing wrapper, a drop-in for Hugging Face PEFT's.

``from peft import get_peft_model, PeftModel`` -> ``from peftkit import get_peft_model, PeftModel``:
same names, signatures and defaults. Calls and attributes the wrapper does not define (``generate``,
``config`` ...) go to the base model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from torch import nn

from . import checkpoint as ckpt
from .config import PeftConfig, TaskType
from .registry import get_method
from .functional import (  # noqa: F401 - re-exported: peft has them next to its PeftModel
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
    tuner_of,
)
from .mixed_model import PeftMixedModel
from .model_api import PeftModelAPI
from .serving import warn_if_tools_see_real_peft
from .signature import ForwardWithBaseSignature
from .tuner import TunerModel


class PeftModel(PeftModelAPI, nn.Module):
    """A base model with named adapters. ``base_model`` is the tuner; ``base_model.model`` the user's model."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        _init: bool = True,
    ) -> None:
        super().__init__()
        warn_if_tools_see_real_peft()
        self.base_model = TunerModel(model)
        # loading (_init=False) or low_cpu_mem_usage (peft's): adapters start on the meta device and take the
        # tensors of the file / state dict loaded next (set_peft_model_state_dict, load_adapter)
        init = _init and not low_cpu_mem_usage
        self.base_model.inject(peft_config, adapter_name, init=init, meta=not init)

    def _forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; ``adapter_names`` (one per batch row, "__base__" for none) mixes adapters in a batch."""
        with self._call_scope(args, kwargs, adapter_names, generate=False):
            if adapter_names is None:
                return self.base_model(*args, **kwargs)
            with self.base_model.route(adapter_names):
                return self.base_model(*args, **kwargs)

    forward = ForwardWithBaseSignature(_forward)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._call_scope(args, kwargs, adapter_names, generate=True):
            if adapter_names is None:
                return self.get_base_model().generate(*args, **kwargs)
            with self.base_model.route(adapter_names):
                return self.get_base_model().generate(*args, **kwargs)

    def _call_scope(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None,
                    generate: bool) -> contextlib.AbstractContextManager:
        """The methods' per-call state around one forward / generate (``Adapter.call_context``; e.g. aLoRA's
        offsets). A method may pop its own arguments from ``kwargs`` (the dict the call then passes on)."""
        call = {"args": args, "kwargs": kwargs, "adapter_names": adapter_names, "generate": generate}
        contexts = [c for c in (cls.call_context(self, call) for cls in list(self.base_model.hooked_methods))
                    if c is not None]
        if len(contexts) <= 1:
            return contexts[0] if contexts else contextlib.nullcontext()
        return _entered_together(contexts)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters --------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.base_model.active_adapters
        return active[0] if len(active) == 1 else list(active)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Attach another adapter; it stays inactive until ``set_adapter`` (``low_cpu_mem_usage``: its tensors on
        the meta device until a state dict is loaded, as in peft)."""
        self.base_model.inject(peft_config, adapter_name, init=not low_cpu_mem_usage, meta=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (their outputs add up); they train unless ``inference_mode``."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Freeze or unfreeze the given adapters (whether or not they are active)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.peft_config[name].inference_mode = not requires_grad
        self.base_model.mark_trainable(extra=names if requires_grad else ())

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        self.base_model.set_disabled(True)
        try:
            yield
        finally:
            self.base_model.set_disabled(False)

    # -- data-dependent setup --------------------------------------------------------------------------
    def prepare_selection(
        self, dataloader: Any = None, loss_fn: Any = None, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """Run the data-dependent step some methods take before training (FISH mask and Child-Tuning D
        score parameters by their Fisher information over ``dataloader``); a no-op for every other method,
        so a training loop may always call it. Build the optimizer afterwards: the trainable tensors change.

        ``loss_fn(model, batch)`` returns the loss (per-sample losses for an exact empirical Fisher); None
        uses the model's own loss on batches that carry labels. ``kwargs`` go to the method.
        """
        names = [adapter_name] if adapter_name is not None else list(self.peft_config)
        for name in names:
            get_method(self.peft_config[name]).adapter_cls.prepare_selection(self, name, dataloader, loss_fn, **kwargs)

    # -- merging ---------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the active adapters into the base weights and return the plain base model."""
        return self.base_model.unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        return self.base_model.unload(merge=False)

    # -- reports ---------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- files -----------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Save each adapter: "default" into ``save_directory``, others into ``save_directory/<name>``.

        ``selected_adapters``: a list of names, or one name. Every name and folder is checked before anything
        is written; each adapter's config and weights are replaced together (see checkpoint.py)."""
        if selected_adapters is None:
            names = list(self.peft_config)
        else:
            names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
            unknown = [n for n in names if n not in self.peft_config]
            if unknown:
                raise ValueError(f"save_pretrained: selected_adapters names unknown adapter(s) {unknown}; "
                                 f"adapters: {list(self.peft_config)}")
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        folders = {n: save_directory if n == "default" else os.path.join(save_directory, n) for n in names}
        for folder in dict.fromkeys([save_directory, *folders.values()]):
            if os.path.isfile(folder):
                raise ValueError(f"{folder}: is a file; save_pretrained needs a folder")
        embeddings = kwargs.get("save_embedding_layers", "auto")  # peft's argument and default
        plans = {n: ckpt.save_plan(self.base_model, n, safe_serialization, embeddings) for n in names}
        for name, plan in plans.items():
            ckpt.commit_save(plan, folders[name])
        self.create_or_update_model_card(save_directory)  # README.md, as peft writes it

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id``. On any error ``model`` (its modules, their
        attributes and hooks, ``requires_grad`` flags, training modes) and ``config`` are left as they were."""
        folder = _resolve_folder(model_id, kwargs.get("subfolder"))
        config, state, source = ckpt.read_adapter(folder, config)
        key_mapping = kwargs.get("key_mapping")
        if key_mapping is None and not config.is_prompt_learning:  # peft: the model's own checkpoint renames
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", {})
        state = ckpt.apply_load_options(state, source, config, kwargs.get("torch_device"), key_mapping,
                                        kwargs.get("ephemeral_gpu_offload", False))
        undo = ckpt.Undo(model, config)
        try:
            config.inference_mode = not is_trainable
            if cls is PeftModel and config.task_type in TASK_MODEL:
                cls = TASK_MODEL[config.task_type]
            # ignore_mismatched_sizes: the skipped tensors keep their init values (built with init, as peft)
            ignore = bool(kwargs.get("ignore_mismatched_sizes", False))
            peft_model = cls(model, config, adapter_name, _init=ignore and not kwargs.get("low_cpu_mem_usage"))
            ckpt.load_state(peft_model.base_model, adapter_name, state, source, ignore)
        except BaseException:
            undo.restore()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> ckpt.LoadResult:
        """Load a saved adapter next to the existing ones (inactive until ``set_adapter``; with ``is_trainable``
        its parameters require grad all the same, as in PEFT).

        An existing ``adapter_name`` takes the saved weights in place (what transformers' Trainer does when it
        resumes from a checkpoint); the file must fit it exactly. On any error nothing changes (as
        ``from_pretrained``), ``peft_config`` included."""
        folder = _resolve_folder(model_id, kwargs.get("subfolder"))
        config, state, source = ckpt.read_adapter(folder, kwargs.get("peft_config"))
        state = ckpt.apply_load_options(state, source, config, torch_device, key_mapping, ephemeral_gpu_offload)
        undo = ckpt.Undo(self, config, self.peft_config)
        ignore = bool(kwargs.get("ignore_mismatched_sizes", False))
        try:
            if adapter_name in self.peft_config:
                ckpt.load_state(self.base_model, adapter_name, state, source, ignore)
                self.peft_config[adapter_name].inference_mode = not is_trainable
                self.base_model.mark_trainable()
            else:
                config.inference_mode = not is_trainable
                init = ignore and not low_cpu_mem_usage  # ignored tensors keep their init values
                self.base_model.inject(config, adapter_name, init=init, meta=not init)
                ckpt.load_state(self.base_model, adapter_name, state, source, ignore)
                if is_trainable:  # as PEFT: inactive, but its parameters train (set_requires_grad)
                    self.base_model.mark_trainable(extra=[adapter_name])
        except BaseException:
            undo.restore()
            raise
        return ckpt.LoadResult([], [])

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             **kwargs: Any) -> None:
        """Add ``adapter_name``, the ``adapters`` combined with ``weights`` (peft's signature and options). The
        names are checked here; the combination is the method's (``Adapter.add_weighted_adapter``: LoRA's,
        ``methods/lora/merging.py``, which says where it differs from peft)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"add_weighted_adapter: adapter {adapter_name!r} already exists; pick another name")
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"add_weighted_adapter: unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)}")
        cls = get_method(self.peft_config[adapters[0]]).adapter_cls
        cls.add_weighted_adapter(self, list(adapters), list(weights), adapter_name, **kwargs)


@contextlib.contextmanager
def _entered_together(contexts: list[contextlib.AbstractContextManager]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def _resolve_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    folder = os.fspath(model_id)
    if subfolder:
        folder = os.path.join(folder, subfolder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: adapter folder not found (peftkit loads from local folders only)")
    return folder


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification: the ``classifier`` / ``score`` head trains in full and is saved."""


class PeftModelForTokenClassification(PeftModel):
    """Token classification: the ``classifier`` / ``score`` head trains in full and is saved."""


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA: the ``qa_outputs`` head trains in full and is saved."""


class PeftModelForCausalLM(PeftModel):
    """Causal language modelling (``generate`` goes to the base model)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language modelling."""


class PeftModelForFeatureExtraction(PeftModel):
    """Embeddings / hidden states."""


TASK_MODEL: dict[TaskType, type[PeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel | PeftMixedModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (the PeftModel subclass follows task_type;
    ``mixed``: a PeftMixedModel, adapters of different types at once, see mixed_model.py)."""
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if peft_config.base_model_name_or_path is None and name_or_path:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if mixed:  # as peft: autocast_adapter_dtype and low_cpu_mem_usage are not passed on
        return PeftMixedModel(model, peft_config, adapter_name=adapter_name)
    cls = TASK_MODEL.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
