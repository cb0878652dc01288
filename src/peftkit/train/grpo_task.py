"""``task: grpo``: reinforcement learning of a causal LM from a rule-based reward with GRPO (the math is in
grpo.py) on ``{prompt, label}`` rows (``data.text_column``, ``data.label_column``).

A training batch of ``B`` prompts: ``G = grpo.num_generations`` completions per prompt are sampled from the
adapted model (``generate`` in eval mode, temperature ``grpo.temperature``, no top-k / top-p, at most
``grpo.max_new_tokens`` tokens, ending at EOS) under a seed that is a function of ``train.seed`` and the
batch's example indices, so a resumed run samples what an uninterrupted one sampled. Each completion is
scored by ``grpo.reward`` against its row's label, and the ``B * G`` rows (prompt, then completion) go through
one forward of the policy and, with ``grpo.beta > 0``, one of the same model with its adapter disabled
under ``no_grad`` (the reference). The prompt is shown the way ``causal_lm`` shows it (the chat template when
the tokenizer has one, else ``prompt + "\\n"``), truncated from the start to leave room for the completion.

Labels and completions are compared as the tokenizer writes them: the label goes through
``decode(encode(label))`` first, so an uncased tokenizer (the MiniLM one of ``llama-tiny``) compares
``sci / tech`` with what it can produce.

Each training step's mean reward, within-group reward std and KL go to metrics.jsonl beside the loss
(``train_stats``: ``reward``, ``reward_std``, ``kl``, averaged over the steps since the last log).

Evaluation on the test rows is greedy (deterministic): ``mean_reward`` (the recipe's reward) and
``accuracy`` (the exact-match reward, case-sensitive, whatever ``grpo.reward`` is: the completion's first
words are the label).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TaskType
from .data import DataError, report_skipped
from .grpo import (exact_reward, grpo_loss, group_advantages, group_reward_std, reference_token_logps,
                   reward, token_logps)
from .models import resolve_model
from .preference import _unwrap
from .preference_task import llama_tiny
from .task import Task, quiet_transformers, register_task


@register_task("grpo")
class GroupRelativePolicyOptimization(Task):
    """GRPO with a rule-based reward; metric: mean reward of the greedy completions of the test prompts."""

    task_type = TaskType.CAUSAL_LM
    main_metric = "mean_reward"
    higher_is_better = True

    def load_data(self) -> None:
        d = self.recipe.data
        self.train_rows = self._rows(d.train, d.train_rows)
        self.test_rows = self._rows(d.test, d.test_rows) if d.test else []
        self.n_train = len(self.train_rows)
        self.last: dict[str, float] = {}  # the last training batch's rewards, KL and clipped fraction

    def _rows(self, source: str, limit: int | None) -> list[tuple[str, str]]:
        d = self.recipe.data
        table = self._table(source, limit, [d.text_column, d.label_column], ["prompt", "label"])
        rows = [(str(r[d.text_column]), str(r[d.label_column]).strip()) for r in table.rows]
        empty = [line for (_, label), line in zip(rows, table.lines) if not label]
        if empty:
            raise DataError(f"{table.source}:{empty[0]}: empty label in column {d.label_column!r}")
        self.notes += [n for n in [report_skipped(table)] if n]
        return rows

    def load_model(self) -> nn.Module:
        if self.recipe.model == "llama-tiny":
            self.tok, model = llama_tiny()
            model.generation_config.eos_token_id = self.tok.eos_token_id  # LlamaConfig's default 2 is no EOS here
            model.generation_config.bos_token_id = None
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            quiet_transformers()
            path = resolve_model(self.recipe.model)
            self.tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else model.generation_config.eos_token_id
        self.stop = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.stop, default=0)
        return model

    # ------------------------------------------------------------------ prompts and completions
    def _prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        else:
            text = prompt + "\n"
        room = self.recipe.data.max_length - self.recipe.grpo.max_new_tokens
        return self.tok(text, add_special_tokens=False)["input_ids"][-room:]

    def canonical(self, label: str) -> str:
        """The label as the tokenizer writes it back (what a completion can equal)."""
        return self.tok.decode(self.tok(label, add_special_tokens=False)["input_ids"], skip_special_tokens=True)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        rows = [self.train_rows[i] for i in indices]
        key = ",".join(map(str, [self.recipe.train.seed, *indices])).encode()
        return {"prompt_ids": [self._prompt_ids(p) for p, _ in rows], "labels_text": [y for _, y in rows],
                "seed": zlib.crc32(key)}

    def generate(self, model: nn.Module, prompts: list[list[int]], *, sample: bool,
                 seed: int = 0) -> list[list[int]]:
        """Completions of left-padded ``prompts``: ``G`` sampled ones per prompt (in prompt order) or one
        greedy one; each cut after its first EOS."""
        from transformers import GenerationConfig

        g = self.recipe.grpo
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        stop = sorted(self.stop) or None
        if sample:
            config = GenerationConfig(do_sample=True, temperature=g.temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=g.max_new_tokens, num_return_sequences=g.num_generations,
                                      pad_token_id=self.pad, eos_token_id=stop)
        else:
            config = GenerationConfig(do_sample=False, max_new_tokens=g.max_new_tokens, pad_token_id=self.pad,
                                      eos_token_id=stop)
        inner = _unwrap(model)
        was_training = inner.training
        inner.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = inner.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            inner.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.stop), len(row))
            completions.append(row[:end])
        return completions

    def encode(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, Tensor]:
        """``prompt + completion`` rows, right-padded (positions 0..n-1, as generation saw them); labels are
        the completion tokens, -100 elsewhere."""
        seqs = [p + c for p, c in zip(prompts, completions)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def rewards(self, completions: list[list[int]], labels: list[str]) -> Tensor:
        texts = self.tok.batch_decode(completions, skip_special_tokens=True)
        return torch.tensor([reward(self.recipe.grpo.reward, t, self.canonical(y)) for t, y in zip(texts, labels)])

    # ------------------------------------------------------------------ the loss
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        g = self.recipe.grpo
        G = g.num_generations
        completions = self.generate(model, batch["prompt_ids"], sample=True, seed=batch["seed"])
        prompts = [p for p in batch["prompt_ids"] for _ in range(G)]
        labels = [y for y in batch["labels_text"] for _ in range(G)]
        rewards = self.rewards(completions, labels)
        advantages = group_advantages(rewards, G).to(self.device)
        rows = self.move(self.encode(prompts, completions))
        logps, mask = token_logps(model, rows)
        ref = reference_token_logps(model, rows) if g.beta else None
        out = grpo_loss(logps, logps.detach(), ref, mask, advantages, g.epsilon, g.beta)
        self.last = {"reward": float(rewards.mean()), "reward_std": float(group_reward_std(rewards, G)),
                     "kl": float(out.kl), "clipped": float(out.clipped)}
        return out.loss

    def train_stats(self) -> dict[str, float]:
        """Logged per step beside the loss: the mean reward of the sampled completions, the mean within-group
        reward standard deviation (TRL's ``reward_std``) and the mean per-token KL to the reference."""
        return {k: self.last[k] for k in ("reward", "reward_std", "kl")}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_rows:
            return {}
        bs = self.recipe.train.eval_batch_size
        total = correct = 0.0
        for s in range(0, len(self.test_rows), bs):
            rows = self.test_rows[s : s + bs]
            completions = self.generate(model, [self._prompt_ids(p) for p, _ in rows], sample=False)
            texts = self.tok.batch_decode(completions, skip_special_tokens=True)
            for text, (_, label) in zip(texts, rows):
                label = self.canonical(label)
                total += reward(self.recipe.grpo.reward, text, label)
                correct += exact_reward(text, label)
        n = len(self.test_rows)
        return {"mean_reward": total / n, "accuracy": correct / n}

    def run_info(self) -> dict[str, Any]:
        return {"eval_decoding": "greedy", "num_generations": self.recipe.grpo.num_generations}
