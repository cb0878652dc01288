"""Running the grid: every (method, model) cell with peftkit, and with ``vs_peft`` with Hugging Face peft too.

Within a cell both implementations are built once, warmed up with one step, and then measured in
``reps`` interleaved repetitions (peftkit, peft, then peft, peftkit, ...): each repetition times ``steps``
training steps, ``infer_iters`` unmerged forwards, the same merged (mergeable methods; the adapter is
unmerged again afterwards) and one forked peak-memory probe; the first repetition also takes the allocator's
peak tensor memory of ``steps`` steps (exactly repeatable, so one sample). Records hold medians over repetitions; the
ratios ours / theirs are taken per repetition (the two ran seconds apart) and summarised by their median,
min-max and IQR.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..methods.selective import SelectionError
from ..model import get_peft_model
from ..targeting import TargetError
from ..train import load_recipe, train

from . import cells
from . import measure as M
from .grid import BenchModel, MethodChoice, cell_config, recipe_path
from .peft_side import load_peft, peft_model

METRICS = ("step_time_s", "peak_mem_mb", "tensor_peak_mb", "infer_unmerged_s", "infer_merged_s")
RATIOS = {"step_time_ratio": "step_time_s", "peak_mem_ratio": "peak_mem_mb", "tensor_peak_ratio": "tensor_peak_mb",
          "infer_unmerged_ratio": "infer_unmerged_s", "infer_merged_ratio": "infer_merged_s"}


@dataclasses.dataclass
class Options:
    steps: int = 3  # timed training steps per repetition (and steps of the memory probe)
    reps: int = 5
    infer_iters: int = 5
    batch: int = 16
    seq: int = 64
    vs_peft: bool = False
    accuracy: bool = False
    accuracy_steps: int = 100
    configs_dir: str | None = "configs"
    threads: int = 1
    memory: bool = True
    log: Callable[[str], None] = print


def _record(choice: MethodChoice, model: BenchModel, impl: str, config: dict, source: str) -> dict[str, Any]:
    return {"method": choice.name, "model": model.name, "impl": impl, "trainable_params": None,
            "trainable_pct": None, "adapter_bytes": None, **{k: None for k in METRICS}, "accuracy": None,
            "skipped": None, "config": config, "config_source": source, "samples": {}}


class _Side:
    """One implementation of one cell: the wrapped model, its optimizer and batches, and its samples."""

    def __init__(self, impl: str, build: Callable[[], nn.Module], model: BenchModel, opts: Options,
                 built: nn.Module | None = None) -> None:
        self.impl, self.build, self.opts = impl, build, opts
        self.model = built if built is not None else build()
        self.model.train()
        self.opt = M.make_optimizer(self.model)
        self.batch = model.batch(self.model, opts.batch, opts.seq)
        self.infer_batch = model.batch(self.model, opts.batch, opts.seq, labels=False)
        self.bench_model = model
        self.samples: dict[str, list] = {k: [] for k in METRICS}
        self.can_merge = True
        M.train_step(self.model, self.opt, self.batch)  # warm-up; also allocates the AdamW state

    def _rebuild(self) -> None:
        """A freshly built model, optimizer and warm-up step (after a merge that cannot be undone)."""
        self.model = self.build()
        self.model.train()
        self.opt = M.make_optimizer(self.model)
        M.train_step(self.model, self.opt, self.batch)

    def static(self, record: dict[str, Any]) -> None:
        trainable, total = M.trainable_counts(self.model)
        record.update(trainable_params=trainable, trainable_pct=100.0 * trainable / total,
                      adapter_bytes=M.adapter_bytes(self.model))

    def _fresh(self) -> tuple[nn.Module, dict]:
        model = self.build()
        return model, self.bench_model.batch(model, self.opts.batch, self.opts.seq)

    def repetition(self, mergeable: bool) -> None:
        o = self.opts
        self.samples["step_time_s"].append(
            M.time_calls(lambda: M.train_step(self.model, self.opt, self.batch), o.steps))
        self.samples["infer_unmerged_s"].append(M.time_forward(self.model, self.infer_batch, o.infer_iters))
        merged = None
        if mergeable and self.can_merge:
            try:
                self.model.merge_adapter()
            except Exception:  # noqa: BLE001 - an implementation that cannot merge this config: no figure
                self.can_merge = False
            else:
                merged = M.time_forward(self.model, self.infer_batch, o.infer_iters)
                try:
                    self.model.unmerge_adapter()
                except Exception:  # noqa: BLE001 - merges but cannot unmerge (peft's OSF): train on a fresh model
                    self.can_merge = False
                    self._rebuild()
        self.samples["infer_merged_s"].append(merged)
        self.samples["peak_mem_mb"].append(M.peak_step_mb(self._fresh, o.steps) if o.memory else None)
        if o.memory and not self.samples["tensor_peak_mb"]:
            self.samples["tensor_peak_mb"].append(M.tensor_peak_mb(self.model, self.opt, self.batch, o.steps))


def _builders(choice: MethodChoice, model: BenchModel, config: dict, vs_peft: bool) -> dict[str, Callable]:

    def prepared(wrapped: nn.Module) -> nn.Module:
        if hasattr(wrapped, "prepare_selection"):
            wrapped.prepare_selection()  # data-free selections (criterion="random"); a no-op for the rest
        return wrapped

    out: dict[str, Callable] = {
        "peftkit": lambda: prepared(get_peft_model(model.build(), choice.spec.config_cls(**config)))}
    if vs_peft:
        peft = load_peft()
        out["peft"] = lambda: peft_model(peft, choice.spec, model.build(), dict(config))
    return out


def _with_our_targets(build: Callable, choice: MethodChoice, model: BenchModel, config: dict, ours: nn.Module,
                      record: dict) -> tuple[Callable, nn.Module]:
    """peft's builder and a first model from it, retried with the modules peftkit picked when peft has no default targets for this
    method and model (e.g. LN tuning on BERT): the same modules, named explicitly."""
    targets = getattr(ours.peft_config.get("default"), "target_modules", None)
    try:
        return build, build()
    except ValueError as exc:
        if "target_modules" not in str(exc) or "target_modules" in config or not isinstance(targets, list):
            raise
    peft = load_peft()
    config = {**config, "target_modules": list(targets)}
    record.update(config=config, config_source=record["config_source"] + "; target_modules: peftkit's defaults")
    build = lambda: peft_model(peft, choice.spec, model.build(), dict(config))  # noqa: E731
    return build, build()


def _skip_reason(impl: str, exc: BaseException) -> str:

    # ours: only "this method does not apply here" (no targets, no data-free selection) is a skip
    if impl == "peftkit" and not isinstance(exc, (TargetError, SelectionError)):
        raise exc  # a crash of our own side is a bug, not a skip
    return f"{type(exc).__name__}: {exc}".strip()


def run_cell(choice: MethodChoice, model: BenchModel, opts: Options) -> list[dict[str, Any]]:
    """The records of one (method, model) cell: one per implementation."""
    config, source = cell_config(choice, model, opts.configs_dir)
    with cells.prepared(choice, model, config) as (model, config):  # X-LoRA's experts, CPT's type masks
        return _run_cell(choice, model, opts, config, source)


def _run_cell(choice: MethodChoice, model: BenchModel, opts: Options, config: dict, source: str) -> list[dict]:
    builders = _builders(choice, model, config, opts.vs_peft)
    records = {impl: _record(choice, model, impl, config, source) for impl in builders}
    sides: dict[str, _Side] = {}
    for impl, build in builders.items():
        try:
            built = None
            if impl == "peft" and "peftkit" in sides:
                build, built = _with_our_targets(build, choice, model, config, sides["peftkit"].model, records[impl])
            sides[impl] = _Side(impl, build, model, opts, built)
            sides[impl].static(records[impl])
        except Exception as exc:  # noqa: BLE001 - NotApplicable / no peft counterpart: report, go on
            sides.pop(impl, None)
            records[impl]["skipped"] = _skip_reason(impl, exc)
            opts.log(f"  {choice.name} x {model.name} [{impl}]: skipped ({records[impl]['skipped']})")
    order = list(sides)
    for rep in range(opts.reps):
        for impl in order if rep % 2 == 0 else order[::-1]:
            if impl not in sides:
                continue
            try:
                sides[impl].repetition(choice.spec.mergeable)
            except Exception as exc:  # noqa: BLE001 - one implementation failing mid-cell: report it, go on
                del sides[impl]
                records[impl]["skipped"] = _skip_reason(impl, exc)
                opts.log(f"  {choice.name} x {model.name} [{impl}]: failed ({records[impl]['skipped']})")
    for impl, side in sides.items():
        rec = records[impl]
        rec["samples"] = side.samples
        for key in METRICS:
            rec[key] = M.median(side.samples[key])
    for side in sides.values():
        del side.model, side.opt
    return list(records.values())


def ratio_record(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """ours / theirs per metric: the median of the per-repetition ratios, with min-max and IQR."""
    out: dict[str, Any] = {"method": ours["method"], "model": ours["model"]}
    for name, key in RATIOS.items():
        s = M.spread(M.paired_ratios(ours["samples"].get(key, []), theirs["samples"].get(key, [])))
        out[name] = s["median"] if s else None
        out[name + "_spread"] = [s["min"], s["max"]] if s else None
        out[name + "_iqr"] = s["iqr"] if s else None
    out["reps"] = len(ours["samples"].get("step_time_s", []))
    out["trainable_params_equal"] = ours["trainable_params"] == theirs["trainable_params"]
    return out


def finetune(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """Run the ``peftkit train`` recipe at ``path`` (no checkpoints, quiet); returns (recipe, summary)."""

    recipe = load_recipe(path, ["train.save_every=0", *overrides])
    return recipe, train(recipe, quiet=True)


def accuracy(choice: MethodChoice, opts: Options, out_dir: str) -> float | None:
    """SST-2 test accuracy of ``configs/sst2_<method>.yaml`` fine-tuned for ``accuracy_steps`` steps."""
    path = recipe_path(opts.configs_dir, choice.name)
    if path is None:
        return None
    _, summary = finetune(path, [f"train.max_steps={opts.accuracy_steps}", f"output_dir={out_dir}",
                                 f"train.num_threads={opts.threads}"])
    return summary.get("test_accuracy")


def run_grid(methods: list[MethodChoice], models: list[BenchModel], opts: Options) -> dict[str, Any]:
    """Run every cell; returns ``{"records": [...], "ratios": [...], "meta": {...}}``."""
    torch.set_num_threads(opts.threads)
    started = time.time()
    records: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for model in models:
        for choice in methods:
            t0 = time.perf_counter()
            cell = run_cell(choice, model, opts)
            if opts.accuracy and model.name == "minilm" and cell[0]["skipped"] is None:
                with tempfile.TemporaryDirectory(prefix="peftkit-bench-acc-") as tmp:
                    cell[0]["accuracy"] = accuracy(choice, opts, os.path.join(tmp, choice.name))
            records += cell
            by = {r["impl"]: r for r in cell}
            if "peft" in by and by["peft"]["skipped"] is None and by["peftkit"]["skipped"] is None:
                ratios.append(ratio_record(by["peftkit"], by["peft"]))
            opts.log(f"{choice.name} x {model.name}: {time.perf_counter() - t0:.1f}s")
    meta = _meta(opts, methods, models, time.time() - started)
    return {"records": records, "ratios": ratios, "meta": meta}


def _meta(opts: Options, methods: list[MethodChoice], models: list[BenchModel], wall: float) -> dict[str, Any]:
    import platform

    import transformers


    meta = {"peftkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "threads": opts.threads, "steps": opts.steps, "reps": opts.reps, "infer_iters": opts.infer_iters,
            "batch": opts.batch, "seq": opts.seq, "vs_peft": opts.vs_peft, "accuracy": opts.accuracy,
            "accuracy_steps": opts.accuracy_steps if opts.accuracy else None,
            "methods": [m.name for m in methods], "models": {m.name: m.description for m in models},
            "wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if opts.vs_peft:
        meta["peft"] = getattr(load_peft(), "__version__", "?")
    return meta
