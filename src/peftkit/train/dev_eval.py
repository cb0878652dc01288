"""Evaluation curves: a dev split evaluated every ``train.eval_every`` optimizer steps.

``data.dev`` names a file (or any source ``data.train`` accepts) of held-out rows in the training format. With
it, the trainer evaluates the dev rows every ``train.eval_every`` steps (``train.eval_every: 0``: only after the
last step) and logs ``{"step": s, "event": "dev", "dev_loss": ...}`` to ``metrics.jsonl``; the test split is
evaluated before and after training only, so the reported test metric was never used to watch the run. The dev
metric names are the test metric names with ``dev_`` for ``test_`` (``dev_loss``, ``dev_perplexity``).

Only task ``causal_lm`` reads ``data.dev`` so far.
"""

from __future__ import annotations

from typing import Any

DEV_TASKS = ("causal_lm",)


def dev_problem(recipe: Any) -> str | None:
    """What is wrong with ``data.dev`` / ``data.dev_rows``, led by the dotted YAML path; None when nothing is."""
    d = recipe.data
    if d.dev is not None and recipe.task not in DEV_TASKS:
        return f"data.dev: only task {', '.join(DEV_TASKS)} reads it (task {recipe.task})"
    if d.dev_rows is not None:
        if d.dev is None:
            return "data.dev_rows: only read with data.dev set"
        if d.dev_rows <= 0:
            return f"data.dev_rows: expected a positive integer or null, got {d.dev_rows}"
    return None


def dev_metric(main_metric: str) -> str:
    """``test_loss`` -> ``dev_loss``: the dev split's name for the task's main metric."""
    return "dev_" + main_metric.removeprefix("test_")
