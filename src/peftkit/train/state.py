"""Run folder bookkeeping: atomic checkpoints (keep the last K), resume, metrics log, schedules.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the adapter in PEFT format and
``trainer_state.pt`` (optimizer, scheduler, RNG states and the running loss sum). It is written under a
temporary name and renamed into place, so a run killed mid-write leaves the previous checkpoint intact.
It is read back with ``torch.load(weights_only=True)``: tensors and plain containers only, nothing
unpickled.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from typing import Any

import torch

from ..io import fsync_dir

CKPT_DIR = "checkpoints"


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)  # linear


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit():
            path = os.path.join(root, name)
            if os.path.isfile(os.path.join(path, "trainer_state.pt")):
                found.append((int(name[5:]), path))
    return sorted(found)


def save_checkpoint(run_dir: str, step: int, model: Any, trainer_state: dict[str, Any], keep_last: int) -> str:
    """Write ``checkpoints/step-NNNNNNN`` under a temporary name and rename it into place. Temporary folders
    that killed saves left (``.tmp-step-*``, ``.old-step-*``) are removed first."""
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.startswith((".tmp-step-", ".old-step-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    model.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    fsync_dir(tmp)
    old = os.path.join(root, f".old-step-{step:07d}")
    if os.path.exists(final):  # the same step again: moved aside, not deleted, until the new one is in place
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    for _, stale in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as written; truncated to a step on resume."""

    def __init__(self, path: str) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (they belong to the part of a killed run that will be redone)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and _step_of(line) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # a torn last line from a kill: drop it
