"""What a run shows at the end: the loss / metric plot (PNG) and the summary table."""

from __future__ import annotations

import os
from typing import Any

from .dev_eval import dev_metric


def plot_series(records: list[dict[str, Any]], main_metric: str) -> dict[str, Any]:
    """What :func:`plot_metrics` draws, from the metrics log: ``train`` (steps, losses) as a line; ``evals``
    (steps, values of ``main_metric``) and ``dev`` (steps, values of ``dev_metric``) as markers at the steps
    they were measured; ``final`` (step, value) the last test evaluation, drawn as an annotation, not a point
    of either curve."""

    train = [r for r in records if "loss" in r and r.get("event") is None]
    evals = [r for r in records if r.get("event") == "eval" and main_metric in r]
    final = (evals[-1]["step"], evals[-1][main_metric]) if len(evals) > 1 else None
    if final is not None:
        evals = evals[:-1]
    name = dev_metric(main_metric)
    dev = [r for r in records if r.get("event") == "dev" and name in r]
    return {"train": ([r["step"] for r in train], [r["loss"] for r in train]),
            "evals": ([r["step"] for r in evals], [r[main_metric] for r in evals]),
            "dev": ([r["step"] for r in dev], [r[name] for r in dev]),
            "main_metric": main_metric, "dev_metric": name, "final": final}


def plot_metrics(records: list[dict[str, Any]], path: str, main_metric: str) -> dict[str, Any]:
    """Training loss against step, and the evaluation points (markers only: nothing is drawn between two
    measurements) on a second axis, the final test metric as a text annotation; saved as PNG. Returns the
    series drawn (:func:`plot_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(records, main_metric)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*series["train"], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss", color="tab:blue")
    handles = ax.get_lines()
    if series["evals"][0] or series["dev"][0]:
        ax2 = ax.twinx()
        if series["evals"][0]:
            handles += ax2.plot(*series["evals"], "o", linestyle="none", color="tab:orange", label=main_metric)
        if series["dev"][0]:
            handles += ax2.plot(*series["dev"], "s", linestyle="none", color="tab:green",
                                label=series["dev_metric"])
        ax2.set_ylabel("evaluation", color="tab:orange")
    if series["final"] is not None:
        step, value = series["final"]
        ax.annotate(f"final {main_metric} = {value:.4f} (step {step})", xy=(0.99, 0.98),
                    xycoords="axes fraction", ha="right", va="top", fontsize=9,
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    ax.set_title("training run")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return series


def summary_table(summary: dict[str, Any]) -> str:
    """A two-column text table of the run's summary."""
    metric = summary.get("main_metric", "")
    rows = [("method", summary["method"]), ("model", summary["model"]), ("task", summary["task"]),
            ("steps", summary["steps"])]
    if f"before_{metric}" in summary:
        rows.append((f"{metric} before", f"{summary[f'before_{metric}']:.4f}"))
    if metric in summary:
        rows.append((f"{metric} after", f"{summary[metric]:.4f}"))
    dev = "dev_" + metric.removeprefix("test_")
    if dev in summary:
        rows.append((f"{dev} (step {summary['dev_step']})", f"{summary[dev]:.4f}"))
    pct = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
    rows += [("trainable parameters", f"{summary['trainable_params']:,d} ({pct:.3f}%)"),
             ("total parameters", f"{summary['total_params']:,d}"), ("wall time", f"{summary['wall_time_s']:.1f} s")]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 30)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
