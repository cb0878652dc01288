"""Few-shot image classification with CLIP (task ``clip_fewshot``): the class names are the classifier.

Each class name goes into a prompt (``data.class_template``, "a photo of a {}."), CLIP's text tower turns the
prompts into one embedding per class, and an image's logits are ``logit_scale * cos(image, class)``, as in
CLIP's zero-shot classification (Radford et al. 2021) and its few-shot adapters (CoOp, CoCoOp,
CLIP-Adapter, Tip-Adapter). The training set is ``data.shots`` images per class (None: all), drawn by a
seeded permutation; the loss is cross-entropy over the classes. A method that supplies its own classifier
(``classify(pixel_values, class_names, tokenizer=, template=)`` on the adapted model, e.g. CoOp's learned
context or CoCoOp's image-conditioned prompts) is used as it is; otherwise the plain ``CLIPModel`` forward
gives ``logits_per_image``, so LoRA, CLIP-Adapter and any method acting inside the towers train through it.
Evaluation also reports ``zero_shot_test_accuracy``: the base CLIP with its adapters disabled, classifying
with the hand-written ``data.class_template`` (computed once per run; the base is frozen).

Images: the image tasks' built-in sources (``builtin:digits/train``, ``builtin:fashion_mnist/test`` ...),
normalised with CLIP's mean and std. Models:

- ``clip-tiny``: a 2 x 2-layer, 64-wide CLIP built from a config with fixed random weights, using the
  MiniLM's WordPiece tokenizer (no download). Only methods that change the towers (LoRA ...) learn on it.
- ``clip-tiny-digits``: the same CLIP after a short contrastive pre-training on real digit images with
  template captions (:class:`DigitsPretraining`), so it has a zero-shot ability for CoOp, CLIP-Adapter and
  the others to improve. Built once (about 15 s on one core) into ``$PEFTKIT_CACHE`` (default
  ``~/.cache/peftkit``) under a name keyed by its settings, as a ``transformers`` CLIP folder with its
  tokenizer and a ``peftkit_pretrain.json`` record of the images it saw.
- any local ``transformers`` CLIP folder with its tokenizer.

A model whose folder carries ``peftkit_pretrain.json`` (``clip-tiny-digits``) never gets its pre-training
images back: they are left out of ``builtin:digits`` training and test rows (a note says how many), so the
shots and the test split are disjoint from what the model was pre-trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .clip_tiny import (CLIP_TINY_DIGITS, DIGITS_SOURCES, clip_pixels, clip_tiny, clip_tiny_digits_path, digits_rows,
                        is_built, pretrain_record)
from .data import DataError
from .models import minilm_dir, resolve_model
from .task import quiet_transformers, register_task
from .vision import ImageClassification

def few_shot_indices(labels: list[int], shots: int | None, seed: int) -> list[int]:
    """The first ``shots`` examples of each class in a seeded permutation (sorted); all when None."""
    if shots is None:
        return list(range(len(labels)))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: dict[int, int] = {}
    keep = []
    for i in perm:
        if taken.get(labels[i], 0) < shots:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            keep.append(i)
    return sorted(keep)


# ------------------------------------------------------------------------------------------------ the task
@register_task("clip_fewshot")
class ClipFewShot(ImageClassification):
    """Few-shot classification by CLIP similarity to class-name prompts; metric: test accuracy. Batches,
    loss and evaluation are image classification's; the data, the model and the logits are its own."""

    _zero_shot: float | None = None
    train_rows: np.ndarray | None = None  # digits sources: each training image's index among all 1,797

    def load_data(self) -> None:
        d, r = self.recipe.data, self.recipe
        if "{}" not in d.class_template:
            raise DataError(f"data.class_template: {d.class_template!r} has no {{}} for the class name")
        for field, source in (("data.train", d.train), ("data.test", d.test)):
            if source and "?" in source:  # the pre-training-pool check maps rows of whole sources
                raise DataError(f"{field}: {source}: task clip_fewshot reads whole sources (no ?classes= filter)")
        super().load_data()
        if d.train in DIGITS_SOURCES:
            self.train_rows = digits_rows(d.train)[: len(self.train_y)]  # data.train_rows keeps the first rows
        record = pretrain_record(r.model)
        if record is not None:
            seen = set(record["pool"])
            self.train_x, self.train_y, self.train_rows = self._unseen(d.train, self.train_x, self.train_y, seen,
                                                                       "training")
            if d.test:
                self.test_x, self.test_y, _ = self._unseen(d.test, self.test_x, self.test_y, seen, "test")
            if r.model == CLIP_TINY_DIGITS and not is_built(clip_tiny_digits_path()):
                self.notes.append(f"{CLIP_TINY_DIGITS}: pre-training it once (about 15 s on one core) into "
                                  f"{clip_tiny_digits_path()}")
        keep = few_shot_indices(self.train_y, d.shots, r.train.seed)
        self.train_x, self.train_y = self.train_x[keep], [self.train_y[i] for i in keep]
        self.train_rows = None if self.train_rows is None else self.train_rows[keep]
        self.n_train = len(self.train_y)
        if d.shots is not None:
            self.notes.append(f"clip_fewshot: {d.shots} shots x {len(self.labels)} classes = {self.n_train} "
                              "training images")

    def _unseen(self, source: str, x: Tensor, y: list[int], seen: set[int],
                what: str) -> tuple[Tensor, list[int], np.ndarray | None]:
        """The rows of a digits source that are not among the model's pre-training images, and their
        indices among all 1,797 (None for other sources, which are returned as they are)."""
        if source not in DIGITS_SOURCES:
            return x, y, None
        rows = digits_rows(source)[: len(y)]
        keep = [i for i, g in enumerate(rows.tolist()) if g not in seen]
        if len(keep) < len(y):
            self.notes.append(f"clip_fewshot: {len(y) - len(keep)} of {len(y)} {what} images of {source} are in "
                              f"{self.recipe.model}'s pre-training pool; left out")
        if not keep:
            raise DataError(f"{source}: every image is in {self.recipe.model}'s pre-training pool")
        return x[keep], [y[i] for i in keep], rows[keep]

    def load_model(self) -> nn.Module:
        from transformers import AutoTokenizer

        r = self.recipe
        quiet_transformers()
        if r.model == "clip-tiny":
            self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
            self.image_size = r.data.image_size or 32
            model = clip_tiny(self.tokenizer.vocab_size, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id,
                              self.image_size)
        else:
            from transformers import CLIPModel

            folder = resolve_model(r.model)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            model = CLIPModel.from_pretrained(folder)
            size = model.config.vision_config.image_size
            if r.data.image_size and r.data.image_size != size:
                raise DataError(f"data.image_size: {r.data.image_size}, but {r.model} takes {size} px images")
            self.image_size = size
        prompts = [r.data.class_template.format(name) for name in self.labels]
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        self.prompt_ids, self.prompt_mask = enc["input_ids"], enc["attention_mask"]
        return model

    def _inputs(self, images: Tensor) -> Tensor:
        return clip_pixels(images, self.image_size)

    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """(batch, classes): the method's own classifier when it has one, else CLIP's ``logits_per_image``."""
        classify = _method_classifier(model)
        if classify is not None:
            return classify(pixel_values, self.labels, tokenizer=self.tokenizer,
                            template=self.recipe.data.class_template)
        ids, mask = self.prompt_ids.to(pixel_values.device), self.prompt_mask.to(pixel_values.device)
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits_per_image

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test accuracy, and ``zero_shot_test_accuracy``: the base CLIP with the hand-written prompt."""
        out = super().evaluate(model)
        disable = getattr(model, "disable_adapter", None)
        if out and disable is not None:
            if self._zero_shot is None:
                with disable():
                    self._zero_shot = super().evaluate(model)["test_accuracy"]
            out["zero_shot_test_accuracy"] = self._zero_shot
        return out


def _method_classifier(model: nn.Module) -> Any:
    """``model.classify`` when the adapted model (or its DDP wrapper's module) has one, else None."""
    inner = getattr(model, "module", model)
    try:
        classify = getattr(inner, "classify")
    except AttributeError:
        return None
    return classify if callable(classify) else None
