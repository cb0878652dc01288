"""What one cell measures: parameter counts, adapter file size, step time, peak memory, inference latency.

Peak memory is the RSS growth of the training steps, measured in a forked child per repetition: the child
builds a fresh model and adapter (set-up, not counted), resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), runs the steps and reports ``VmHWM`` minus the RSS before the first step. A
fork costs milliseconds (no re-import of torch, and the MiniLM weights are already in memory) and starts
from a clean allocator for the new tensors, so freed memory of earlier cells in the parent cannot hide the
growth. The child runs with one thread (intra-op thread pools do not survive ``fork``). On systems without
``fork`` or ``/proc`` the figure is None. The growth includes a floor of about 18 MB that even a tiny model
shows (first-step runtime buffers of the child), the same for both libraries; ratios of methods with small
activations therefore read ~1.0.

Peak tensor memory is the allocator's view of the same steps, in-process on the warm model: the profiler
records every tensor allocation and free of the CPU allocator (``profile_memory``); the peak of their running
sum is the most tensor memory the steps held above what was live before them (weights, AdamW state). It
counts bytes the libraries asked for, not pages the kernel kept, so it is free of the RSS floor and of the
allocator's caching, and repeats exactly (single-threaded autograd allocates in a fixed order): one sample
per implementation decides a ratio that RSS growth cannot separate from noise.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, as the model's own ``get_nb_trainable_parameters`` reports them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(int(x) for x in model.get_nb_trainable_parameters())  # type: ignore[return-value]
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_bytes(model: nn.Module) -> int:
    """Bytes on disk of ``save_pretrained`` into a temporary folder: every file, config included."""
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        model.save_pretrained(tmp)
        return folder_bytes(tmp)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


COPIED_INPUTS = ("input_type_mask",)  # peft's CPT shifts the caller's mask in place


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    """Forward, backward, AdamW step, zero_grad (inputs a library changes in place passed as copies)."""
    if any(k in batch for k in COPIED_INPUTS):
        batch = {k: v.clone() if k in COPIED_INPUTS else v for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_calls(fn: Callable[[], Any], n: int) -> float:
    """Mean seconds per call over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def time_forward(model: nn.Module, batch: dict, n: int) -> float:
    """Mean seconds per inference forward (eval mode, inference_mode); restores train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(**batch)  # warm-up: caches, lazily built merged weights
            return time_calls(lambda: model(**batch), n)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ memory
def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _step_growth_mb(build: Callable[[], tuple[nn.Module, dict]], steps: int) -> float:
    """In this process: build, then the peak RSS of ``steps`` training steps over the RSS after set-up."""
    model, batch = build()
    model.train()
    opt = make_optimizer(model)
    gc.collect()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        train_step(model, opt, batch)
    peak = max(status_kb("VmHWM"), status_kb("VmRSS"))
    return (peak - before) / 1024


def peak_step_mb(build: Callable[[], tuple[nn.Module, dict]], steps: int) -> float | None:
    """RSS growth (MiB) of ``steps`` training steps of a freshly built model, in a forked child."""
    if not hasattr(os, "fork") or not os.path.exists("/proc/self/clear_refs"):
        return None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, write the number, leave without running the parent's cleanup
        code = 0
        try:
            os.close(read)
            torch.set_num_threads(1)
            value = _step_growth_mb(build, max(1, steps))
            os.write(write, repr(value).encode())
        except BaseException:  # noqa: BLE001 - a failed child reports nothing, the parent records None
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        return None
    return float(text)


def tensor_peak_mb(model: nn.Module, opt: torch.optim.Optimizer, batch: dict, steps: int) -> float:
    """Peak tensor memory (MiB) of ``steps`` training steps above what was live before them (allocator records)."""
    gc.collect()
    return tensor_peak_bytes(lambda: [train_step(model, opt, batch) for _ in range(max(1, steps))]) / 2**20


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """The most tensor bytes ``fn`` held at once above what was live before it, from the allocator's records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return peak_of_records(prof.profiler.kineto_results.events())


def peak_of_records(events: Any) -> int:
    """The peak running sum of the allocator's ``[memory]`` records (bytes: + allocation, - free), in time order."""
    records = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]")
    live = peak = 0
    for _, _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------------ stats
def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> dict[str, Any] | None:
    """Median, min-max and interquartile range of samples (None when there are none)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "iqr": [q1, q3], "n": len(xs)}


def paired_ratios(ours: list[float | None], theirs: list[float | None]) -> list[float]:
    """Per-repetition ratios ours / theirs (the two ran seconds apart), skipping missing samples."""
    return [o / t for o, t in zip(ours, theirs) if o is not None and t is not None and t > 0]
