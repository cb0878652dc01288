"""Training recipes: one nested YAML file (plus ``key=value`` overrides) checked before any model loads.

A recipe names the base model, the task, the data, the PEFT method with its config, and the optimisation
settings. Every field has a type; a wrong type, an unknown key or a missing data file raises
:class:`RecipeError` naming the field by its dotted YAML path (``train.lr``), so a run fails in a second
instead of after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..registry import get_method
from .data import HF_PREFIX, DataError, parse_hf
from .packing import causal_lm_options_problem
from .chat import chat_options_problem
from .dev_eval import dev_problem
from .preference import PreferenceSpec, preference_problem
from .grpo import GrpoSpec, grpo_problem
from .dreambooth import DreamBoothSpec, dreambooth_problem
from .typed_yaml import RecipeError, build, check_duplicate_keys, parse_overrides, set_dotted
from .diffusion_spec import DiffusionSpec, IPAdapterSpec, diffusion_problem, ip_adapter_problem
from .control import ControlSpec, control_problem


@dataclass
class DataSpec:
    """Where the examples are and which columns hold what.

    ``train`` / ``test``: a .tsv, .csv or .jsonl file, a Hugging Face data set split
    (``hf:stanfordnlp/sst2@train``, ``hf:glue:sst2@validation``, or ``hf:FOLDER@train`` for a local one; needs
    the ``datasets`` package), or a built-in source (``builtin:fashion_mnist``, ``builtin:digits``); relative
    paths resolve against the recipe file's folder.
    """

    train: str = "builtin:sst2/train"
    test: str | None = "builtin:sst2/test"
    text_column: str = "sentence"
    label_column: str = "label"
    response_column: str = "response"  # causal_lm: the prompt is text_column, the loss is on this one
    max_length: int = 64
    image_size: int | None = None  # image_cls / diffusion: pixels per side (None: the model's own size)
    train_rows: int | None = None  # use the first N training rows
    test_rows: int | None = None
    bad_rows: str = "fail"  # "fail" or "skip" (skipped rows are counted and reported with line numbers)
    labels: list[str | int] | None = None  # classification: the label set, in class-index order (None: inferred)
    shots: int | None = None  # clip_fewshot: training images per class (None: all)
    class_template: str = "a photo of a {}."  # clip_fewshot: the prompt each class name goes into
    packing: bool = False  # causal_lm: several examples per row, attention kept within each (packing.py)
    pack_length: int | None = None  # tokens per packed row (None: max_length)
    chat_template: bool = False  # causal_lm: {messages: [{role, content}]} rows, loss on assistant turns (chat.py)
    dev: str | None = None  # held-out rows evaluated every train.eval_every steps (dev_eval.py)
    dev_rows: int | None = None  # use the first N dev rows


@dataclass
class TrainSpec:
    """Optimisation settings (AdamW)."""

    max_steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.01
    schedule: str = "linear"  # "linear", "cosine" or "constant" (after warm-up)
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # autocast to bfloat16 (CPU and CUDA)
    gradient_checkpointing: bool = False
    loraplus_lr_ratio: float | None = None  # LoRA+: lr of lora_B = lr * ratio
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only before and after training
    save_every: int = 100  # checkpoint period in optimizer steps (0: never)
    keep_last: int = 2  # checkpoints kept
    eval_batch_size: int = 128
    num_threads: int | None = None  # torch threads (None: leave torch's default)
    strategy: str = "ddp"  # under torchrun: "ddp" (replicated model) or "fsdp" (FSDP2, parameters sharded)
    ce_chunk_size: int | None = None  # causal_lm: loss through the LM head in chunks of N tokens (chunked_ce.py)


@dataclass
class Recipe:
    """A whole run. ``peft`` holds the config fields of ``method`` (a registered method name)."""

    model: str = "minilm"
    model_quant: str = "none"  # "4bit" (NF4, double quant: QLoRA) or "8bit" base via bitsandbytes (peftkit.quant)
    task: str = "seq_cls"  # seq_cls, causal_lm, image_cls, clip_fewshot, diffusion, dpo, grpo, dreambooth
    method: str = "lora"
    peft: dict[str, Any] = field(
        default_factory=lambda: {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
    )
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    output_dir: str = "runs/sst2-lora"
    resume: bool = False
    tensorboard: bool = False
    num_labels: int | None = None  # classification: inferred from the training labels when None
    preference: PreferenceSpec = field(default_factory=PreferenceSpec)  # task dpo: the loss and its fields
    grpo: GrpoSpec = field(default_factory=GrpoSpec)  # task grpo: sampling, reward, clip and KL (grpo.py)
    dreambooth: DreamBoothSpec = field(default_factory=DreamBoothSpec)  # task dreambooth (dreambooth.py)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)  # diffusion / dreambooth: what is adapted
    control: ControlSpec = field(default_factory=ControlSpec)  # diffusion + controlnet / t2i_adapter (control.py)
    ip_adapter: IPAdapterSpec = field(default_factory=IPAdapterSpec)  # diffusion + ip_adapter (diffusion_spec.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TASKS = ("seq_cls", "causal_lm", "image_cls", "clip_fewshot", "diffusion", "dpo", "grpo", "dreambooth", "image_caption")
CHOICES = {
    "task": TASKS,
    "model_quant": ("none", "4bit", "8bit"),
    "data.bad_rows": ("fail", "skip"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.strategy": ("ddp", "fsdp"),
}
POSITIVE = ("train.max_steps", "train.batch_size", "train.grad_accum", "train.keep_last", "data.max_length",
            "train.eval_batch_size", "train.log_every")
NON_NEGATIVE = ("train.save_every", "train.eval_every")  # 0: never
POSITIVE_OR_NULL = ("train.max_grad_norm", "train.loraplus_lr_ratio", "data.image_size", "data.shots")


def load_recipe(path: str | None = None, overrides: list[str] = ()) -> Recipe:
    """Read ``path`` (None: the built-in default run), apply overrides, check every field and data file."""
    tree: dict[str, Any] = {}
    base_dir = os.getcwd()
    if path is not None:
        if not os.path.isfile(path):
            raise RecipeError(f"{path}: recipe file not found")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{path}: not UTF-8 text ({exc})") from None
        try:
            check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), "")
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise RecipeError(f"{path}: expected a mapping at the top level")
        base_dir = os.path.dirname(os.path.abspath(path))
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    if "peft" in tree and tree["peft"] is None:
        tree["peft"] = {}
    recipe = build(Recipe, tree, "")
    if path is not None and "peft" not in tree and recipe.method != "lora":
        recipe.peft = {}
    _validate(recipe, base_dir)
    return recipe


def _get(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def _validate(recipe: Recipe, base_dir: str) -> None:
    for dotted, allowed in CHOICES.items():
        if _get(recipe, dotted) not in allowed:
            raise RecipeError(f"{dotted}: expected one of {', '.join(allowed)}, got {_get(recipe, dotted)!r}")
    for section in ("data", "train"):
        for f in dataclasses.fields(getattr(recipe, section)):
            value = getattr(getattr(recipe, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{section}.{f.name}: expected a finite number, got {value}")
    for dotted in POSITIVE:
        if _get(recipe, dotted) <= 0:
            raise RecipeError(f"{dotted}: expected a positive integer, got {_get(recipe, dotted)}")
    for dotted in NON_NEGATIVE:
        if _get(recipe, dotted) < 0:
            raise RecipeError(f"{dotted}: expected 0 (never) or a positive integer, got {_get(recipe, dotted)}")
    for dotted in POSITIVE_OR_NULL:
        if _get(recipe, dotted) is not None and _get(recipe, dotted) <= 0:
            kind = "integer" if dotted.startswith("data.") else "number"
            raise RecipeError(f"{dotted}: expected a positive {kind} or null, got {_get(recipe, dotted)}")
    if recipe.train.lr <= 0:
        raise RecipeError(f"train.lr: expected a positive number, got {recipe.train.lr}")
    if recipe.train.weight_decay < 0:
        raise RecipeError(f"train.weight_decay: expected a number >= 0, got {recipe.train.weight_decay}")
    if not 0 <= recipe.train.warmup_ratio < 1:
        raise RecipeError(f"train.warmup_ratio: expected a number in [0, 1), got {recipe.train.warmup_ratio}")
    _check_labels(recipe)
    problem = next(filter(None, (f(recipe) for f in (causal_lm_options_problem, chat_options_problem, dev_problem,
               preference_problem, grpo_problem, dreambooth_problem, diffusion_problem, control_problem,
               ip_adapter_problem))), None)
    if problem:
        raise RecipeError(problem)
    _check_output_dir(recipe.output_dir)
    try:
        spec = get_method(recipe.method)
    except KeyError as exc:
        raise RecipeError(f"method: {exc.args[0]}") from None
    try:
        config = build_peft_config(recipe, spec)
    except RecipeError:
        raise
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"peft: {exc}") from None
    if recipe.data.packing and (config.is_prompt_learning or getattr(config, "is_adaption_prompt", False)):
        raise RecipeError(f"data.packing: method {recipe.method} adds virtual tokens to each row, which packed "
                          "rows of several examples cannot hold; set data.packing=false")
    for name in ("train", "test", "dev"):
        source = getattr(recipe.data, name)
        if source is None or source.startswith("builtin:"):
            continue
        if source.startswith(HF_PREFIX):
            _check_hf_source(f"data.{name}", source)
            continue
        resolved = source if os.path.isabs(source) else os.path.join(base_dir, source)
        if not os.path.isfile(resolved):
            raise RecipeError(f"data.{name}: file not found: {source}")
        setattr(recipe.data, name, os.path.normpath(resolved))


def _check_labels(recipe: Recipe) -> None:
    """``data.labels``: distinct, non-empty strings or integers (kept as strings), at least two."""
    labels = recipe.data.labels
    if labels is None:
        return
    if recipe.task != "seq_cls":
        raise RecipeError(f"data.labels: only task seq_cls reads it (task {recipe.task} takes its classes from "
                          "the data source)")
    names = [str(x).strip() for x in labels]
    if len(names) < 2:
        raise RecipeError(f"data.labels: expected at least 2 labels, got {labels}")
    for name in names:
        if not name:
            raise RecipeError("data.labels: an empty label")
        if names.count(name) > 1:
            raise RecipeError(f"data.labels: {name!r} is listed twice")
    if recipe.num_labels is not None and recipe.num_labels != len(names):
        raise RecipeError(f"num_labels: {recipe.num_labels}, but data.labels declares {len(names)}")
    recipe.data.labels = names


def _check_output_dir(output_dir: str) -> None:
    """The run folder is a folder, or can become one (no file in its place or on its path)."""
    if not output_dir.strip():
        raise RecipeError("output_dir: expected a folder path, got ''")
    path = os.path.abspath(output_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        inside = "" if path == os.path.abspath(output_dir) else f"{output_dir}: "
        raise RecipeError(f"output_dir: {inside}{path} is a file, not a folder")


def _check_hf_source(field: str, source: str) -> None:
    """A Hugging Face source is well formed and ``datasets`` is importable (the data loads later)."""
    try:
        parse_hf(source)
    except DataError as exc:
        raise RecipeError(f"{field}: {exc}") from None
    if importlib.util.find_spec("datasets") is None:
        raise RecipeError(f"{field}: {source} needs the datasets package (pip install datasets)")


def build_peft_config(recipe: Recipe, spec: Any = None, **extra: Any):
    """The method's config object from ``recipe.peft`` (unknown fields are errors here, not warnings)."""

    spec = spec or get_method(recipe.method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(recipe.peft) - fields)
    if unknown:
        raise RecipeError(f"peft.{unknown[0]}: not a field of {spec.config_cls.__name__}")
    return spec.config_cls(**{**recipe.peft, **extra})

