"""``task: dpo``: preference tuning of a causal LM on ``{prompt, chosen, rejected}`` rows with the loss of
``preference.loss`` (DPO, IPO, ORPO or SimPO; the math is in preference.py).

A training batch of ``B`` pairs is one forward of ``2B`` rows (the ``B`` chosen responses, then the ``B``
rejected ones, each after its prompt); DPO and IPO add a second forward of the same rows through the same
model with its adapter disabled, under ``no_grad``: the reference. The prompt is shown the way ``causal_lm``
shows it (the tokenizer's chat template when it has one, else ``prompt + "\\n"``), the response is followed
by EOS, and a row longer than ``data.max_length`` loses the start of its prompt (the response is kept).

Evaluation on the test pairs: ``reward_accuracy`` and ``reward_margin`` (see preference.py), ``test_loss``
(the preference loss) and, when ``preference.candidates`` lists the label set, ``label_accuracy``: the
fraction of test prompts whose chosen response has the highest summed log-probability among the candidates.
The reference log-probabilities of the test pairs depend on the frozen base only and are computed once.

Models: a folder, a model id, a built-in name (models.py), or ``llama-tiny``: a 2-layer, 32-wide Llama with
fixed random weights (seed 0) and the MiniLM tokenizer, built in memory, for tests and quick checks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import TaskType
from .data import DataError, Table, bad_row, report_skipped
from .models import resolve_model
from .packages import minilm_dir
from .preference import REFERENCE_LOSSES, pair_loss, reference_logps, response_logps
from .task import Task, quiet_transformers, register_task


def llama_tiny() -> tuple[Any, nn.Module]:
    """The ``llama-tiny`` tokenizer and model (weights a fixed function of the shape: seed 0)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=512,
                         initializer_range=0.3)  # wide logits, so a low-rank update moves the log-probs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tok, LlamaForCausalLM(config)


@register_task("dpo")
class PreferenceTuning(Task):
    """Pairwise preference tuning; metric: reward accuracy on the test pairs."""

    task_type = TaskType.CAUSAL_LM
    main_metric = "reward_accuracy"
    higher_is_better = True

    def load_data(self) -> None:
        d = self.recipe.data
        self.train_rows = self._pairs(d.train, d.train_rows)[0]
        self.test_rows: list[tuple[str, str, str]] = []
        if d.test:
            self.test_rows, lines = self._pairs(d.test, d.test_rows)
            candidates = self.recipe.preference.candidates
            if candidates:
                for (_, chosen, _), line in zip(self.test_rows, lines):
                    if chosen not in candidates:
                        raise DataError(f"{d.test}:{line}: chosen response {chosen!r} is not one of "
                                        f"preference.candidates {candidates}")
        self.n_train = len(self.train_rows)
        self._test_ref: Tensor | None = None

    def _pairs(self, source: str, limit: int | None) -> tuple[list[tuple[str, str, str]], list[int]]:
        """The usable ``(prompt, chosen, rejected)`` rows of ``source`` and their line numbers."""
        d, p = self.recipe.data, self.recipe.preference
        cols = [d.text_column, p.chosen_column, p.rejected_column]
        table = self._table(source, limit, cols, ["prompt", "chosen", "rejected"])
        rows, lines, skipped = [], [], list(table.skipped)
        for row, line in zip(table.rows, table.lines):
            prompt, chosen, rejected = (str(row[c]) for c in cols)
            if chosen.strip() == rejected.strip():
                bad_row(table, line, "chosen and rejected responses are the same", d.bad_rows, skipped)
                continue
            rows.append((prompt, chosen.strip(), rejected.strip()))
            lines.append(line)
        if not rows:
            raise DataError(f"{table.source}: no usable rows")
        self.notes += [n for n in [report_skipped(Table(table.source, [], [], skipped))] if n]
        return rows, lines

    def load_model(self) -> nn.Module:
        if self.recipe.model == "llama-tiny":
            self.tok, model = llama_tiny()
            return model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        path = resolve_model(self.recipe.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # ------------------------------------------------------------------ batches
    def _prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        else:
            text = prompt + "\n"
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
        """``(prompt, response)`` rows, right-padded; labels are the response (+ EOS) tokens, else -100."""
        max_len = self.recipe.data.max_length
        eos = self.tok.eos_token_id
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos if eos is not None else 0)
        seqs, labels = [], []
        for prompt, response in pairs:
            r = (self.tok(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
            r = r[: max_len - 1]  # at least one prompt token precedes the first scored token
            p = self._prompt_ids(prompt)[-(max_len - len(r)):]
            seqs.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, y) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            lab[i, : len(y)] = torch.tensor(y)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}

    def pair_batch(self, rows: list[tuple[str, str, str]]) -> dict[str, Tensor]:
        """The chosen rows, then the rejected rows."""
        return self.encode([(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows])

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return self.pair_batch([self.train_rows[i] for i in indices])

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        spec = self.recipe.preference
        logps, counts = response_logps(model, batch)
        ref = reference_logps(model, batch) if spec.loss in REFERENCE_LOSSES else None
        return pair_loss(spec, logps, counts, ref).loss

    # ------------------------------------------------------------------ evaluation
    def _score(self, model: nn.Module, pairs: list[tuple[str, str]], reference: bool) -> tuple[Tensor, Tensor]:
        """Summed response log-probs and token counts of ``(prompt, response)`` rows, in eval batches."""
        bs = self.recipe.train.eval_batch_size
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # less padding
        sums, counts = torch.zeros(len(pairs)), torch.zeros(len(pairs), dtype=torch.long)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            batch = self.move(self.encode([pairs[i] for i in idx]))
            if reference:
                sums[idx] = reference_logps(model, batch).float().cpu()
            else:
                lp, n = response_logps(model, batch)
                sums[idx], counts[idx] = lp.float().cpu(), n.cpu()
        return sums, counts

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_rows:
            return {}
        spec, rows = self.recipe.preference, self.test_rows
        was_training = model.training
        model.eval()
        n = len(rows)
        pairs = [(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows]
        candidates = spec.candidates or []
        where: list[int] = []  # row i, candidate k -> its index in the scored rows
        for i, (p, c, r) in enumerate(rows):
            for k in candidates:
                if k in (c, r):
                    where.append(i if k == c else n + i)  # chosen and rejected are scored already
                else:
                    where.append(len(pairs))
                    pairs.append((p, k))
        logps, counts = self._score(model, pairs, reference=False)
        ref = None
        if spec.loss in REFERENCE_LOSSES:
            if self._test_ref is None:  # the base is frozen: its log-probs of the test pairs never change
                self._test_ref = self._score(model, pairs[: 2 * n], reference=True)[0]
            ref = self._test_ref
        out = pair_loss(spec, logps[: 2 * n], counts[: 2 * n], ref)
        diff = out.chosen_rewards - out.rejected_rewards
        metrics = {"reward_accuracy": float((diff > 0).float().mean()), "reward_margin": float(diff.mean()),
                   "test_loss": float(out.loss)}
        if candidates:
            best = logps[torch.tensor(where)].view(n, len(candidates)).argmax(1).tolist()
            metrics["label_accuracy"] = sum(candidates[b] == c for b, (_, c, _) in zip(best, rows)) / n
        model.train(was_training)
        return metrics
