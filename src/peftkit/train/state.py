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
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
