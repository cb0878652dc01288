"""The text tasks (``seq_cls``, ``causal_lm``) and ``TASKS``, the table of every task: importing this module
imports the image and diffusion tasks too, so the table is complete. The interface: :mod:`peftkit.train.task`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import TaskType
from .chunked_ce import check_plain_head, chunked_lm_loss
from .losses import supervised_lm_loss, supervised_tokens
from .packing import check_packed_attention, flattens, pack_examples
from .chat import no_template_message, read_conversations, tokenize_conversation
from .data import DataError, Table, report_skipped
from .recipe import RecipeError
from .labels import encode_labels, infer_labels
from .models import resolve_model
from .task import TASKS, Task, quiet_transformers, register_task  # noqa: F401  (TASKS: the table, re-exported)
from . import clip_fewshot, control_task, diffusion, dreambooth_task, grpo_task, image_caption, ip_adapter_task, preference_task, vision  # noqa: F401  (importing registers their tasks in TASKS)


@register_task("seq_cls")
class SequenceClassification(Task):
    """Text classification with a fresh head (``AutoModelForSequenceClassification``); metric: accuracy."""

    task_type = TaskType.SEQ_CLS

    labels: list[str] | None = None  # restored from a trained run, else inferred from the training rows

    def load_data(self) -> None:
        d = self.recipe.data
        cols, kinds = [d.text_column, d.label_column], ["text", "label"]
        train = self._table(d.train, d.train_rows, cols, kinds)
        if self.labels is not None:
            origin = "the trained run's labels"
        elif d.labels:
            self.labels, origin = [str(name) for name in d.labels], "declared in data.labels"
        else:
            train, self.labels = infer_labels(train, d.label_column, d.bad_rows)
            origin = f"inferred from {train.source}; list every class in data.labels to allow others"
        if self.recipe.num_labels is not None and self.recipe.num_labels != len(self.labels):
            raise DataError(f"num_labels: {self.recipe.num_labels}, but {d.train} has {len(self.labels)} labels")
        train, self.train_y = encode_labels(train, d.label_column, self.labels, d.bad_rows, origin=origin)
        if not train.rows:
            raise DataError(f"{train.source}: no usable rows")
        unused = sorted(set(self.labels) - {self.labels[y] for y in self.train_y})
        if unused and d.labels:
            self.notes.append(f"data.labels: no training rows for {unused}")
        self.train_x = [str(r[d.text_column]) for r in train.rows]
        self.test_x: list[str] = []
        self.test_y: list[int] = []
        if d.test:
            test = self._table(d.test, d.test_rows, cols, kinds)
            test, self.test_y = encode_labels(test, d.label_column, self.labels, d.bad_rows, origin=origin,
                                              strict=True)
            self.test_x = [str(r[d.text_column]) for r in test.rows]
            self.notes += [n for n in [_skipped(test)] if n]
        self.notes += [n for n in [_skipped(train)] if n]
        self.n_train = len(self.train_x)

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        path = resolve_model(self.recipe.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={name: i for i, name in enumerate(self.labels)},
        )

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        return dict(
            self.tok(texts, padding=True, truncation=True, max_length=self.recipe.data.max_length, return_tensors="pt")
        )

    def batch(self, indices: list[int]) -> dict[str, Any]:
        enc = self._encode([self.train_x[i] for i in indices])
        enc["labels"] = torch.tensor([self.train_y[i] for i in indices])
        return enc

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_x:
            return {}
        was_training = model.training
        model.eval()
        order = sorted(range(len(self.test_x)), key=lambda i: len(self.test_x[i]))  # less padding per batch
        bs, correct = self.recipe.train.eval_batch_size, 0
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            logits = model(**self.move(self._encode([self.test_x[i] for i in idx]))).logits
            correct += int((logits.argmax(-1).cpu() == torch.tensor([self.test_y[i] for i in idx])).sum())
        model.train(was_training)
        return {"test_accuracy": correct / len(self.test_x)}

    def run_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])


def _skipped(table: Table) -> str | None:
    return report_skipped(table)


@register_task("causal_lm")
class InstructionTuning(Task):
    """Causal-LM instruction tuning: the loss covers the response tokens only; metric: test loss.

    A row is ``prompt`` (``data.text_column``) and ``response`` (``data.response_column``); the model sees
    the tokenizer's chat template when it has one, else ``prompt + "\\n"``, then the response and EOS.
    Prompt and padding positions get label -100, so they do not count in the loss.

    ``data.packing``: a training batch's examples are packed several to a row (packing.py); evaluation
    batches stay padded. ``train.ce_chunk_size``: the loss never forms the whole logits (chunked_ce.py).
    ``data.chat_template``: rows are ``{messages: [...]}`` conversations, loss on assistant turns (chat.py).
    ``data.dev``: held-out rows whose loss is logged every ``train.eval_every`` steps (dev_eval.py).
    """

    task_type = TaskType.CAUSAL_LM
    main_metric = "test_loss"
    higher_is_better = False
    flat = False  # flash attention: a packed batch is one flattened row (set by load_model)

    def load_data(self) -> None:
        d = self.recipe.data
        self.train_rows = self._rows(d.train, d.train_rows)
        self.test_rows = self._rows(d.test, d.test_rows) if d.test else []
        self.dev_rows = self._rows(d.dev, d.dev_rows) if d.dev else []
        self.n_train = len(self.train_rows)

    def _rows(self, source: str, limit: int | None) -> list[Any]:
        """(prompt, response) pairs, or message lists with ``data.chat_template``; skipped rows become notes."""
        d = self.recipe.data
        if d.chat_template:
            table, rows = read_conversations(source, limit, d.bad_rows)
            if not rows:
                raise DataError(f"{table.source}: no usable rows")
        else:
            table = self._table(source, limit, [d.text_column, d.response_column], ["prompt", "response"])
            rows = [(str(r[d.text_column]), str(r[d.response_column])) for r in table.rows]
        self.notes += [n for n in [_skipped(table)] if n]
        return rows

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        path = resolve_model(self.recipe.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.recipe.data.chat_template and not getattr(self.tok, "chat_template", None):
            raise RecipeError(no_template_message(self.recipe.model))  # before the weights load
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if self.recipe.data.packing:
            check_packed_attention(model)  # a model whose attention ignores the restarts fails here
            self.flat = flattens(model)
        if self.recipe.train.ce_chunk_size:
            check_plain_head(model)
        return model

    def _prompt_text(self, prompt: str) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt + "\n"

    def _pad_id(self) -> int:
        eos = self.tok.eos_token_id
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos if eos is not None else 0)

    def _tokenize(self, rows: list[Any]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of prompt + response (+ EOS), truncated to ``data.max_length``, and their labels."""
        max_len = self.recipe.data.max_length
        if self.recipe.data.chat_template:
            pairs = [tokenize_conversation(self.tok, messages, max_len) for messages in rows]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        eos = self.tok.eos_token_id
        seqs, labels = [], []
        for prompt, response in rows:
            p = self.tok(self._prompt_text(prompt), add_special_tokens=False)["input_ids"]
            r = self.tok(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ids = (p + r)[:max_len]
            seqs.append(ids)
            labels.append(([-100] * len(p) + r)[:max_len])
        return seqs, labels

    def _encode(self, rows: list[Any]) -> dict[str, Tensor]:
        seqs, labels = self._tokenize(rows)
        pad = self._pad_id()
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, y) in enumerate(zip(seqs, labels)):  # right padding: positions stay 0..n-1
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            lab[i, : len(y)] = torch.tensor(y)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}

    def batch(self, indices: list[int]) -> dict[str, Any]:
        rows = [self.train_rows[i] for i in indices]
        d = self.recipe.data
        if not d.packing:
            return self._encode(rows)
        seqs, labels = self._tokenize(rows)
        capacity = None if self.flat else (d.pack_length or d.max_length)
        return pack_examples(seqs, labels, capacity, self._pad_id())[0]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        if self.recipe.train.ce_chunk_size:
            return chunked_lm_loss(model, batch, self.recipe.train.ce_chunk_size)
        return supervised_lm_loss(model, batch)  # logits for the response tokens only

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self._mean_loss(model, self.test_rows, "test")

    def evaluate_dev(self, model: nn.Module) -> dict[str, float]:
        """``dev_loss`` / ``dev_perplexity`` on ``data.dev`` (empty without one)."""
        return self._mean_loss(model, self.dev_rows, "dev")

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, rows: list[Any], split: str) -> dict[str, float]:
        if not rows:
            return {}
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        bs = max(1, self.recipe.train.batch_size)
        for s in range(0, len(rows), bs):
            batch = self.move(self._encode(rows[s : s + bs]))
            n = supervised_tokens(batch["labels"])
            if n:
                total += float(self.loss(model, batch)) * n
            tokens += n
        model.train(was_training)
        loss = total / max(tokens, 1)
        return {f"{split}_loss": loss, f"{split}_perplexity": float(torch.exp(torch.tensor(loss)))}


# the image tasks register themselves on import (their heavy dependencies load only when they run)
