"""What a run shows at the end: the loss / metric plot (PNG) and the summary table."""

from __future__ import annotations

import os
from typing import Any


def plot_metrics(records: list[dict[str, Any]], path: str, main_metric: str) -> None:
    """Training loss against step, and the main evaluation metric on a second axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval" and main_metric in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r[main_metric] for r in evals], "o-", color="tab:orange",
                 label=main_metric)
        ax2.set_ylabel(main_metric, color="tab:orange")
    ax.set_title("training run")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def summary_table(summary: dict[str, Any]) -> str:
    """A two-column text table of the run's summary."""
    metric = summary.get("main_metric", "")
    rows = [("method", summary["method"]), ("model", summary["model"]), ("task", summary["task"]),
            ("steps", summary["steps"])]
    if f"before_{metric}" in summary:
        rows.append((f"{metric} before", f"{summary[f'before_{metric}']:.4f}"))
    if metric in summary:
        rows.append((f"{metric} after", f"{summary[metric]:.4f}"))
    pct = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
    rows += [("trainable parameters", f"{summary['trainable_params']:,d} ({pct:.3f}%)"),
             ("total parameters", f"{summary['total_params']:,d}"), ("wall time", f"{summary['wall_time_s']:.1f} s")]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 30)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
