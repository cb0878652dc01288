"""LLaVA-style tuning of a vision-language model (task ``image_caption``): an image and a templated caption
or question, the loss on the answer tokens only, the metric the answer's accuracy.

Each example is one image and its class word (:mod:`peftkit.train.caption_data`). ``data.class_template``
holds one ``{}``: the text before it is the prompt, the rest (with the class word) is the answer, so
``"a handwritten digit {}"`` is a caption and ``"What digit is this? {}"`` a question. The model reads::

    <image> x n_image_tokens, prompt tokens | answer tokens, EOS

with label -100 on the image tokens, the prompt and the padding (right padding), so only the answer and
its end token carry loss (the mean next-token cross-entropy over them, :func:`supervised_lm_loss`). Every
example's prompt is the same, so a batch differs only in its images and answers.

Metrics on ``data.test`` (before and after training):

- ``test_accuracy`` (the main one): the answer of the closed set (the classes' words) whose tokens have
  the highest total log-probability after the prompt. Answers with one token need one forward pass
  together; longer ones one pass per distinct prefix.
- ``test_generation_accuracy``: greedy decoding from the prompt gives exactly the answer's tokens and EOS.

The settings of LLaVA-style tuning are method configs over ``model.multi_modal_projector`` (the
connector) and the language model (``configs/digits_llava_*.yaml``): the projector alone (``ln_tuning``
on its two Linear layers: a trainable copy of each, as ``modules_to_save`` would train it), the projector
and the LM's norm layers (``ln_tuning`` with the projector in ``modules_to_save``), the projector and LoRA
on the LM (``lora`` with a ``target_modules`` regex over ``language_model``). Models:
:mod:`peftkit.train.llava_models` (``llava-tiny``, ``llava-smollm2``, or a local LLaVA folder).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TaskType
from .caption_data import read_examples
from .clip_tiny import clip_pixels
from .data import DataError
from .llava_models import LLAVA_TINY, image_tokens, llava_tiny, load_llava, tiny_tokenizer
from .losses import supervised_lm_loss
from .models import resolve_model
from .task import Task, quiet_transformers, register_task


def split_template(template: str) -> tuple[str, str, bool]:
    """``data.class_template`` -> (prompt, answer pattern with ``{}``, whether a space parts them)."""
    if template.count("{}") != 1:
        raise DataError(f"data.class_template: {template!r} needs exactly one {{}} (where the answer starts)")
    at = template.index("{}")
    prompt = template[:at]
    return prompt.rstrip(), template[at:], prompt != prompt.rstrip()


@register_task("image_caption")
class ImageCaption(Task):
    """Caption / question answering on images with a LLaVA model; metric: answer accuracy."""

    task_type = TaskType.CAUSAL_LM
    answers: list[str] | None = None  # the closed answer set (class words), restored from a trained run

    def load_data(self) -> None:
        d = self.recipe.data
        self.prompt, self.pattern, self.spaced = split_template(d.class_template)
        self.train_x, train_words, classes, note = read_examples(d.train, d.train_rows, d.label_column,
                                                                  d.bad_rows)
        self.notes += [note] if note else []
        if self.answers is None:
            self.answers = classes if classes is not None else sorted(set(train_words))
        self.train_y = self._indices(d.train, train_words)
        self.test_x, self.test_y = torch.zeros(0, 1, 1, dtype=torch.uint8), []
        if d.test:
            self.test_x, test_words, _, note = read_examples(d.test, d.test_rows, d.label_column, d.bad_rows)
            self.notes += [note] if note else []
            self.test_y = self._indices(d.test, test_words)
        if len(self.answers) < 2:
            raise DataError(f"{d.train}: {len(self.answers)} distinct answer(s); expected at least 2")
        self.n_train = len(self.train_y)

    def _indices(self, source: str, words: list[str]) -> list[int]:
        index = {w: i for i, w in enumerate(self.answers)}
        unknown = sorted(set(words) - set(index))
        if unknown:
            raise DataError(f"{source}: answer {unknown[0]!r} is not among the run's answers {self.answers}")
        return [index[w] for w in words]

    # ------------------------------------------------------------------------------------------- model
    def load_model(self) -> nn.Module:
        r = self.recipe
        quiet_transformers()
        if r.model == LLAVA_TINY:
            self.tok = tiny_tokenizer()
            model = llava_tiny(self.tok, r.data.image_size or 16)
        else:
            model, self.tok = load_llava(resolve_model(r.model))
        self.image_size = model.config.vision_config.image_size
        if r.data.image_size and r.data.image_size != self.image_size:
            raise DataError(f"data.image_size: {r.data.image_size}, but {r.model} takes {self.image_size} px images")
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eos is None:
            raise DataError(f"model: {r.model}'s tokenizer has no end token (eos_token or sep_token)")
        self.eos = eos
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        image = [model.config.image_token_id] * image_tokens(model.config)
        self.prompt_ids = image + (self._ids(self.prompt) if self.prompt else [])
        self.answer_ids = [self._ids((" " if self.spaced else "") + self.pattern.format(w)) for w in self.answers]
        twins = [self.answers[i] for i, a in enumerate(self.answer_ids) if self.answer_ids.count(a) > 1]
        if twins or not all(self.answer_ids):
            raise DataError(f"data.class_template: answers {twins or self.answers} tokenize to the same or no tokens")
        width = len(self.prompt_ids) + max(map(len, self.answer_ids)) + 1
        limit = model.config.text_config.max_position_embeddings
        if width > min(limit, r.data.max_length):
            raise DataError(f"data.max_length: an example takes {width} tokens ({len(image)} for the image), over "
                            f"{min(limit, r.data.max_length)}")
        return model

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------------------------------- batches
    def encode(self, images: Tensor, answers: list[int]) -> dict[str, Tensor]:
        """Pixel values, input ids (prompt, answer, EOS; right padding), attention mask and labels."""
        seqs = [self.prompt_ids + self.answer_ids[a] + [self.eos] for a in answers]
        width, n_prompt = max(map(len, seqs)), len(self.prompt_ids)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, n_prompt : len(s)] = ids[i, n_prompt : len(s)]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": clip_pixels(images, self.image_size),
                "labels": labels}

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return self.encode(self.train_x[indices], [self.train_y[i] for i in indices])

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return supervised_lm_loss(model, batch)  # logits for the answer tokens only

    # ------------------------------------------------------------------------------------------- metrics
    def _logprobs(self, model: nn.Module, pixels: Tensor, cont: list[int], keep: int) -> Tensor:
        """Log-probabilities (batch, keep, vocab) of the tokens after the last ``keep`` positions of prompt +
        ``cont``, for every image of ``pixels``."""
        ids = torch.tensor([self.prompt_ids + cont], device=pixels.device).expand(len(pixels), -1)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, logits_to_keep=keep)
        return F.log_softmax(out.logits[:, -keep:].float(), -1)

    def scores(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """(batch, answers): each answer's total token log-probability after the prompt."""
        out = torch.empty(len(pixels), len(self.answers), device=pixels.device)
        groups: dict[tuple[int, ...], list[int]] = {}
        for a, toks in enumerate(self.answer_ids):
            groups.setdefault(tuple(toks[:-1]), []).append(a)
        for prefix, members in groups.items():
            logp = self._logprobs(model, pixels, list(prefix), len(prefix) + 1)
            for a in members:
                toks = torch.tensor(self.answer_ids[a], device=pixels.device)
                out[:, a] = logp.gather(2, toks.view(1, -1, 1).expand(len(pixels), -1, 1)).sum((1, 2))
        return out

    def generated_correct(self, model: nn.Module, pixels: Tensor, gold: list[int]) -> Tensor:
        """Whether greedy decoding gives exactly the gold answer's tokens then EOS (a row stops once it
        leaves the gold answer: its result is known)."""
        targets = [self.answer_ids[g] + [self.eos] for g in gold]
        alive = torch.ones(len(gold), dtype=torch.bool)
        for step in range(max(map(len, targets))):
            rows = [i for i in range(len(gold)) if alive[i] and step < len(targets[i])]
            if not rows:
                break
            by_prefix: dict[tuple[int, ...], list[int]] = {}
            for i in rows:
                by_prefix.setdefault(tuple(targets[i][:step]), []).append(i)
            for prefix, members in by_prefix.items():
                nxt = self._logprobs(model, pixels[members], list(prefix), 1)[:, -1].argmax(-1).cpu()
                for j, i in enumerate(members):
                    alive[i] = bool(nxt[j] == targets[i][step])
        return alive

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_y:
            return {}
        was_training = model.training
        model.eval()
        bs, chosen, generated = self.recipe.train.eval_batch_size, 0, 0
        for s in range(0, len(self.test_y), bs):
            gold = self.test_y[s : s + bs]
            pixels = self.move({"x": clip_pixels(self.test_x[s : s + bs], self.image_size)})["x"]
            chosen += int((self.scores(model, pixels).argmax(-1).cpu() == torch.tensor(gold)).sum())
            generated += int(self.generated_correct(model, pixels, gold).sum())
        model.train(was_training)
        n = len(self.test_y)
        return {"test_accuracy": chosen / n, "test_generation_accuracy": generated / n}

    def run_info(self) -> dict[str, Any]:
        return {"answers": self.answers}

    def restore_info(self, info: dict[str, Any]) -> None:
        self.answers = list(info["answers"])
