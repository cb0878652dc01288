"""``peftkit merge``, ``peftkit eval`` and ``peftkit inspect MODEL``: working with runs and base models."""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import PeftConfig
from ..model import PeftModel, get_peft_model
from ..registry import get_method
from .models import resolve_model
from .recipe import Recipe, load_recipe
from .tasks import TASKS, Task


def open_run(path: str, overrides: list[str] = ()) -> tuple[Recipe, Task, str]:
    """A run folder's recipe, its task (label set restored from the run) and its adapter folder."""
    config = os.path.join(path, "config.yaml")
    adapter = os.path.join(path, "adapter")
    if not (os.path.isfile(config) and os.path.isdir(adapter)):
        raise FileNotFoundError(f"{path}: not a run folder (expected config.yaml and adapter/ inside)")
    recipe = load_recipe(config, list(overrides))
    task = TASKS[recipe.task](recipe)
    summary = os.path.join(path, "summary.json")
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            task.restore_info(json.load(f))
    return recipe, task, adapter


def load_trained(path: str, overrides: list[str] = (), *, need_data: bool = False) -> tuple[Any, Task]:
    """The base model of a run with its adapter loaded (a peftkit PeftModel), and the run's task."""

    recipe, task, adapter = open_run(path, overrides)
    if recipe.train.num_threads:
        import torch

        torch.set_num_threads(recipe.train.num_threads)
    if need_data:
        task.load_data()
    model = PeftModel.from_pretrained(task.load_model(), adapter)
    return model, task


def merge(path: str, out: str) -> str:
    """Merge a run's (or an adapter folder's) adapter into its base model and save it in transformers format (a
    diffusion run: the folder its task's ``save_merged`` writes, which a recipe reads back as ``model: OUT``)."""

    task = None
    if os.path.isfile(os.path.join(path, "config.yaml")):
        model, task = load_trained(path)
        tokenizer = getattr(task, "tok", None)
    else:
        from transformers import AutoModel

        config = PeftConfig.from_pretrained(path)
        if not config.base_model_name_or_path:
            raise ValueError(f"{path}: adapter_config.json names no base_model_name_or_path; merge a run folder")
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(config.base_model_name_or_path), path)
        tokenizer = None
    merged = model.merge_and_unload()
    if hasattr(task, "save_merged"):  # a task whose model is more than one transformers model (diffusion)
        task.save_merged(merged, out)
        return out
    if not hasattr(merged, "save_pretrained"):
        raise ValueError(f"{path}: the merged model is a {type(merged).__name__}, which has no save_pretrained")
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def evaluate(path: str, overrides: list[str] = ()) -> dict[str, float]:
    model, task = load_trained(path, overrides, need_data=True)
    return task.evaluate(model)


def inspect_model(name: str, method: str | None, fields: dict[str, Any] | None = None) -> str:
    """The module tree of ``name`` (a built-in name, folder or model id) and what ``method`` would target."""
    from transformers import AutoConfig, AutoModel


    path = resolve_model(name)
    model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    lines = [f"{name}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,d} parameters"]
    targeted: dict[str, int] = {}
    if method:

        spec = get_method(method)
        config = spec.config_cls(**(fields or {}))
        peft_model = get_peft_model(model, config)
        for module_name, module in peft_model.get_base_model().named_modules():
            own = sum(p.numel() for p in module.parameters(recurse=True) if p.requires_grad)
            if own and hasattr(module, "base_layer"):
                targeted[module_name] = own
        trainable, total = peft_model.get_nb_trainable_parameters()
        lines.append(f"{method}: {trainable:,d} trainable parameters ({100 * trainable / total:.3f}%) "
                     f"in {len(targeted)} modules")
        model = peft_model.get_base_model()
    for module_name, module in model.named_modules():
        if not module_name or ".adapters" in module_name or module_name.endswith(".base_layer"):
            continue
        depth = module_name.count(".")
        label = type(module.base_layer if hasattr(module, "base_layer") else module).__name__
        mark = f"  <- {method}: {targeted[module_name]:,d}" if module_name in targeted else ""
        lines.append(f"{'  ' * depth}{module_name.rsplit('.', 1)[-1]} ({label}){mark}")
    return "\n".join(lines)

