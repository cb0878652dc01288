"""The task interface of ``peftkit train``: what a run loads, how a batch is built, its loss and its main
metric; and the table of tasks by name (``register_task``).

A task reads its data first (so bad rows fail before a model loads), then loads the base model. The
trainer asks it for batches by example index, so the data order is a pure function of the seed and the
step: a resumed or multi-process run sees exactly the examples an uninterrupted single-process run sees.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import TaskType
from .data import DataError, Table, check_columns, read_table
from .recipe import Recipe

TASKS: dict[str, Callable[[Recipe], "Task"]] = {}


def register_task(name: str):
    def deco(cls):
        TASKS[name] = cls
        return cls

    return deco


class Task:
    """Base class. Subclasses fill ``n_train`` in ``load_data`` and implement the rest."""

    task_type: TaskType | None = None
    main_metric = "test_accuracy"
    higher_is_better = True

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.n_train = 0
        self.notes: list[str] = []  # e.g. skipped-row reports, printed by the trainer
        self.device = torch.device("cpu")  # set by the trainer

    def move(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the run's device."""
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def load_data(self) -> None:
        raise NotImplementedError

    def load_model(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, indices: list[int]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return model(**batch).loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def train_stats(self) -> dict[str, float]:
        """Measures of the last ``loss`` call (e.g. GRPO's mean reward), logged beside the loss in metrics.jsonl
        and averaged over the steps since the last log, as the loss is. The same keys on every call."""
        return {}

    def finish(self, model: nn.Module, run_dir: str) -> None:
        """Called once on rank 0 after training, once the adapter is saved (e.g. to render samples)."""

    def run_info(self) -> dict[str, Any]:
        """Saved with the run (e.g. the label set)."""
        return {}

    def restore_info(self, info: dict[str, Any]) -> None:
        """Take back what ``run_info`` saved, so a trained run's model loads without its training data."""

    def _table(self, source: str, limit: int | None, columns: list[str], kinds: list[str]) -> Table:
        table = check_columns(read_table(source, limit), columns, kinds, self.recipe.data.bad_rows)
        if not table.rows:
            raise DataError(f"{table.source}: no usable rows")
        return table


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "head newly initialised" load report is expected here
    hf_logging.disable_progress_bar()
