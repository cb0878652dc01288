"""The training loop behind ``peftkit train``.

One run: read the data, load the base model, wrap it with the recipe's method, evaluate, train with AdamW
(warm-up + linear / cosine decay, gradient accumulation and clipping, optional bf16 autocast, gradient
checkpointing, LoRA+ groups, per-step method hooks such as AdaLoRA's rank allocation), checkpoint every
``save_every`` steps, evaluate again, and write the run folder. Under ``torchrun`` it trains data-parallel
with DDP or FSDP2 (gloo on CPU, NCCL on CUDA; see distributed.py); only adapter parameters are trainable,
so only they are all-reduced.

Example ``i`` of the global batch at optimizer step ``s`` and micro-step ``m`` is a pure function of the
seed: an epoch-wise permutation of the training rows seeded by ``(seed, epoch)``. Rank ``r`` of ``W``
takes rows ``r*B .. (r+1)*B`` of the ``W*B`` global batch, so ``W`` processes at batch ``B`` see exactly
what one process sees at batch ``W*B``, and a resumed run sees what an uninterrupted one saw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from typing import Any

import torch
import yaml
from torch import nn

from ..checkpoint import read_weights
from ..io import atomic_write_text
from ..methods.lora.optim import create_loraplus_optimizer
from ..model import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from ..registry import get_method
from .models import quantize_base
from .recipe import Recipe, build_peft_config
from .report import plot_metrics, summary_table
from .distributed import (
    full_training_state,
    gather_objects,
    init_process_group,
    load_full_training_state,
    mean_across_ranks,
    shard_fsdp,
    wrap_ddp,
)
from .resume import check_resume
from .state import MetricsLog, checkpoint_dirs, load_trainer_state, lr_factor, rng_state, save_checkpoint, set_rng_state
from .tasks import TASKS


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


def example_indices(seed: int, n: int, start: int, count: int) -> list[int]:
    """Examples ``start .. start+count`` of the endless stream of seeded per-epoch permutations of ``n`` rows."""
    out: list[int] = []
    while len(out) < count:
        pos = start + len(out)
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.extend(perm[offset : offset + count - len(out)])
    return out


class Trainer:
    def __init__(self, recipe: Recipe, *, quiet: bool = False) -> None:
        self.recipe = recipe
        self.quiet = quiet
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.run_dir = recipe.output_dir
        self.metrics = MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"))
        self.comm_numel = 0  # elements all-reduced (data-parallel runs)

    def log(self, text: str) -> None:
        if not self.quiet and self.rank == 0:
            print(text, flush=True)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        r = self.recipe
        if r.task not in TASKS:
            raise TrainingError(f"task: no task {r.task!r} (known: {sorted(TASKS)})")
        if r.train.num_threads:
            torch.set_num_threads(r.train.num_threads)
        self.task = TASKS[r.task](r)
        self.task.load_data()  # bad rows fail here, before the model loads
        for note in self.task.notes:
            self.log(note)
        torch.manual_seed(r.train.seed)
        random.seed(r.train.seed)
        base = quantize_base(self.task.load_model(), r.model_quant)
        if torch.cuda.is_available():
            self.task.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.task.device)
            base.to(self.task.device)
        config = build_peft_config(r, task_type=self.task.task_type) if _has_task_type(r) else build_peft_config(r)
        self.model = get_peft_model(base, config)
        self._prepare_selection(config)
        if r.train.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers 5.x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif hasattr(base, "gradient_checkpointing_enable"):
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            elif hasattr(base, "enable_gradient_checkpointing"):  # diffusers models (non-reentrant by default)
                base.enable_gradient_checkpointing()
            else:
                raise TrainingError("train.gradient_checkpointing: the base model has no activation checkpointing")
        self.trainable, self.total = self.model.get_nb_trainable_parameters()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.forward_model: nn.Module = self.model
        if self.world > 1:
            self._setup_ddp()
        self.optimizer = self._optimizer()
        t = r.train
        warmup = int(t.warmup_ratio * t.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.max_steps, warmup, t.schedule)
        )

    def _prepare_selection(self, config: Any) -> None:
        """Data-dependent selection (FISH mask, Child-Tuning D): score parameters on ``num_samples`` training
        examples, in a seeded order of their own, before the optimizer sees the trainable tensors."""
        num = getattr(config, "num_samples", None)
        if not num:
            return
        t = self.recipe.train
        n = min(num, self.task.n_train)
        idx = example_indices(t.seed + 1, self.task.n_train, 0, n)
        batches = [self.task.move(self.task.batch(idx[s : s + t.batch_size])) for s in range(0, n, t.batch_size)]
        self.log(f"{self.recipe.method}: scoring parameters on {n} training examples")
        self.model.prepare_selection(batches)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.recipe.train
        if t.loraplus_lr_ratio:
            return create_loraplus_optimizer(
                self.model, torch.optim.AdamW, lr=t.lr, loraplus_lr_ratio=t.loraplus_lr_ratio,
                weight_decay=t.weight_decay,
            )
        return torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)

    def _setup_ddp(self) -> None:
        init_process_group()
        if self.fsdp:
            shard_fsdp(self.model, self.model.get_base_model())
            self.params = [p for p in self.model.parameters() if p.requires_grad]  # now sharded DTensors
        else:
            self.forward_model = wrap_ddp(self.model, self.params, self.world, self)

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.recipe.train.strategy == "fsdp"

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step: int, loss_sum: float, loss_count: int,
                         stat_sums: dict[str, float] | None = None) -> None:
        """Every rank calls it: RNG states are gathered, and under FSDP so are the adapter and optimizer."""
        rngs = gather_objects(rng_state(), self.world)
        full = full_training_state(self.model, self.optimizer) if self.fsdp else None
        if self.rank != 0:
            if self.fsdp:
                get_peft_model_state_dict(self.model)  # rank 0's save_pretrained gathers the adapter: a collective
            return
        state = {
            "step": step,
            "optimizer": full["optimizer"] if full else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "loss_sum": loss_sum,
            "loss_count": loss_count,
            "stat_sums": dict(stat_sums or {}),  # the task's training measures, summed like the loss
            "recipe": self.recipe.to_dict(),  # a resume compares it with its own recipe (resume.check_resume)
        }
        if full:
            state["trainable"] = full["trainable"]  # full tensors by parameter name: resumes on any world size
        save_checkpoint(self.run_dir, step, self.model, state, self.recipe.train.keep_last)

    def _resume(self) -> tuple[int, float, int]:
        found = checkpoint_dirs(self.run_dir)
        if not found:
            self.log(f"resume: no checkpoint in {self.run_dir}; starting from step 0")
            return 0, 0.0, 0
        step, path = found[-1]
        state = load_trainer_state(path)
        check_resume(state.get("recipe"), self.recipe, path)  # a changed peft.* field, seed or lr: say what
        if "trainable" in state:
            load_full_training_state(self.model, self.optimizer, state)
        elif self.fsdp:
            raise TrainingError(f"resume: {path} was written by a run without train.strategy=fsdp; "
                                "resume it with the strategy it was trained with")
        else:

            tensors, _ = read_weights(path)
            set_peft_model_state_dict(self.model, tensors)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ranks = state.get("rng_ranks")
        set_rng_state(ranks[self.rank] if ranks and len(ranks) == self.world else state["rng"])
        if self.rank == 0:  # the only writer: ranks rewriting the file at once could empty it
            self.metrics.truncate_after(step)
        self.stat_sums = {k: float(v) for k, v in state.get("stat_sums", {}).items()}
        self.log(f"resumed from {path} (step {step})")
        return step, float(state["loss_sum"]), int(state["loss_count"])

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        r, t = self.recipe, self.recipe.train
        start_time = time.perf_counter()
        self.setup()
        os.makedirs(self.run_dir, exist_ok=True)
        self.stat_sums = {}  # the task's training measures (train_stats, e.g. GRPO's reward) since the last log
        step, loss_sum, loss_count = self._resume() if r.resume else (0, 0.0, 0)
        if step == 0:
            if self.rank == 0 and os.path.exists(self.metrics.path):
                os.remove(self.metrics.path)
            before = self._evaluate()
            self._record({"step": 0, "event": "eval", **before})
        self.log(f"{r.method} on {r.model}: {self.trainable:,d} trainable of {self.total:,d} parameters "
                 f"({100 * self.trainable / self.total:.3f}%)")
        before = next((m for m in self.metrics.read() if m.get("event") == "eval" and m["step"] == 0), {})
        if self.task.main_metric in before:
            self.log(f"before training: {self.task.main_metric} = {before[self.task.main_metric]:.4f}")

        writer = self._tensorboard()
        self.forward_model.train()
        bar = self._progress(step)
        window_start, window_samples = time.perf_counter(), 0
        global_bs = t.batch_size * self.world
        while step < t.max_steps:
            loss_value = self._train_step(step, global_bs)
            if not math.isfinite(loss_value):
                last = checkpoint_dirs(self.run_dir)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                raise TrainingError(f"loss is {loss_value} at step {step + 1}; stopping ({where})")
            step += 1
            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            for k, v in self.step_stats.items():
                self.stat_sums[k] = self.stat_sums.get(k, 0.0) + v
            window_samples += global_bs * t.grad_accum
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                stats = {k: v / loss_count for k, v in self.stat_sums.items()}
                record = {"step": step, "loss": loss_sum / loss_count, "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": window_samples / max(elapsed, 1e-9), **stats}
                self._record(record)
                if writer:
                    for k in ("loss", "lr", *stats):
                        writer.add_scalar(f"train/{k}", record[k], step)
                loss_sum, loss_count, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
                self.stat_sums = {}
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", **{k: f"{v:.3f}" for k, v in stats.items()},
                                    lr=f"{record['lr']:.2e}", ex_s=f"{record['samples_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if r.data.dev and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
                dev = self._evaluate(dev=True)  # data.dev: the curve is on dev rows (dev_eval.py)
                self._record({"step": step, "event": "dev", **dev})
                if writer:
                    for k, v in dev.items():
                        writer.add_scalar(f"dev/{k}", v, step)
            elif t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                self._record({"step": step, "event": "eval", **self._evaluate()})
            if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                self._save_checkpoint(step, loss_sum, loss_count, self.stat_sums)
        if bar is not None:
            bar.close()
        after = self._evaluate()
        self._record({"step": step, "event": "eval", **after})
        if writer:
            for k, v in after.items():
                writer.add_scalar(f"eval/{k}", v, step)
            writer.close()
        return self._finish(before, after, time.perf_counter() - start_time)

    def _train_step(self, step: int, global_bs: int) -> float:
        """One optimizer step; returns its loss, and leaves in ``self.step_stats`` the task's ``train_stats``
        of the step (the mean over micro-batches and ranks)."""
        t = self.recipe.train
        total = 0.0
        stats: dict[str, float] = {}
        for micro in range(t.grad_accum):
            start = (step * t.grad_accum + micro) * global_bs + self.rank * t.batch_size
            idx = example_indices(t.seed, self.task.n_train, start, t.batch_size)
            batch = self.task.move(self.task.batch(idx))
            sync = contextlib.nullcontext()
            if self.world > 1 and micro < t.grad_accum - 1 and hasattr(self.forward_model, "no_sync"):
                sync = self.forward_model.no_sync()
            with sync, self._autocast():
                loss = self.task.loss(self.forward_model, batch) / t.grad_accum
            with sync:
                loss.backward()
            total += float(loss.detach())
            for k, v in self.task.train_stats().items():
                stats[k] = stats.get(k, 0.0) + float(v) / t.grad_accum
        if self.world > 1:
            total = mean_across_ranks(total)
            stats = {k: mean_across_ranks(stats[k]) for k in sorted(stats)}  # every rank's task gives the same keys
        self.step_stats = stats
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            return total
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.optimizer.step()
        hook = getattr(self.model.base_model, "on_step", None)
        if hook is not None:
            hook(step + 1)  # per-step method hooks (AdaLoRA's rank allocation) see the gradients before zero_grad
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _autocast(self):
        if not self.recipe.train.bf16:
            return contextlib.nullcontext()
        device = "cuda" if next(self.model.parameters()).is_cuda else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)

    def _evaluate(self, dev: bool = False) -> dict[str, float]:
        with self._autocast():
            return self.task.evaluate_dev(self.model) if dev else self.task.evaluate(self.model)

    def _record(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.metrics.write(record)

    def _progress(self, step: int):
        if self.quiet or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.recipe.train.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def _tensorboard(self):
        if not self.recipe.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard: not installed (pip install tensorboard); logging to metrics.jsonl only")
            return None
        return SummaryWriter(os.path.join(self.run_dir, "tensorboard"))

    def _finish(self, before: dict[str, Any], after: dict[str, float], wall: float) -> dict[str, Any]:
        r = self.recipe
        summary = {
            "method": r.method, "model": r.model, "task": r.task, "steps": r.train.max_steps,
            "main_metric": self.task.main_metric, **after,
            **{f"before_{k}": before[k] for k in after if k in before},
            "trainable_params": self.trainable, "total_params": self.total,
            "world_size": self.world, "allreduced_numel": self.comm_numel, "wall_time_s": round(wall, 2),
            **self.task.run_info(),
        }
        devs = [m for m in self.metrics.read() if m.get("event") == "dev"] if self.rank == 0 else []
        if devs:  # the last dev evaluation, apart from the test metric above
            summary.update({"dev_step": devs[-1]["step"], "dev_evals": len(devs),
                            **{k: v for k, v in devs[-1].items() if k.startswith("dev_")}})
        if self.rank != 0 and self.fsdp:
            get_peft_model_state_dict(self.model)  # gathering the sharded adapter is a collective
        if self.rank == 0:
            self.model.save_pretrained(os.path.join(self.run_dir, "adapter"))
            self.task.finish(self.model, self.run_dir)
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"),
                              yaml.safe_dump(r.to_dict(), sort_keys=False))
            atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
            plot_metrics(self.metrics.read(), os.path.join(self.run_dir, "metrics.png"), self.task.main_metric)
            self.log(summary_table(summary))
        return summary


def _has_task_type(recipe: Recipe) -> bool:
    fields = {f.name for f in dataclasses.fields(get_method(recipe.method).config_cls)}
    return "task_type" in fields and "task_type" not in recipe.peft


def train(recipe: Recipe, *, quiet: bool = False) -> dict[str, Any]:
    """Run ``recipe``; returns the summary written to ``summary.json``."""
    import torch.distributed as dist

    trainer = Trainer(recipe, quiet=quiet)
    try:
        summary = trainer.run()
        if trainer.world > 1 and dist.is_initialized():
            dist.barrier()  # every rank waits for rank 0's files before the group goes away
        return summary
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()  # exiting with live gloo threads aborts the process
