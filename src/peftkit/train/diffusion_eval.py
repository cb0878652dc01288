"""Did the adapter learn what it should? A small digit classifier scoring generated samples.

The diffusion tasks' denoising loss says how well the model predicts noise, not whether its samples show the
digit their prompt names. :func:`digit_classifier` trains a small MLP on scikit-learn's digits train split
(1,437 images; the 360 test images are held out to report its own accuracy), at the task's image size and in
the task's pixel range ([-1, 1], bilinear resize, as :func:`peftkit.train.images.to_model_input`), once per
size and process: full-batch Adam, fixed seed, one thread's worth of seconds, so the same size gives the same
classifier bit for bit.

:func:`sample_accuracy` is the fraction of generated samples the classifier reads as the digit their prompt
asks for. The diffusion and DreamBooth tasks report it with the adapter on (``sample_accuracy``) and off
(``sample_accuracy_adapter_off``) in every evaluation, so ``summary.json`` holds both, before and after
training. It applies when the training images are scikit-learn's digits and the prompted classes are digits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .images import DIGIT_LABELS, digits, split_source, to_model_input

SEED = 0
STEPS = 300  # full-batch Adam steps
HIDDEN = 128
DIGITS_SOURCES = ("builtin:digits", "builtin:digits/train", "builtin:digits/test")


class DigitClassifier(nn.Module):
    """MLP (size^2 -> HIDDEN -> 10) on single-channel images in [-1, 1]; ``test_accuracy`` on the held-out
    digits is recorded when it is trained."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size * size, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
        self.test_accuracy = float("nan")

    def forward(self, images: Tensor) -> Tensor:
        """Logits (N, 10) of images (N, C, size, size) in [-1, 1]; several channels are averaged."""
        if images.shape[-2:] != (self.size, self.size):
            raise ValueError(f"digit classifier: expected {self.size}x{self.size} images, got "
                             f"{tuple(images.shape[-2:])}")
        return self.net(images.float().mean(1))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self(images.cpu()).argmax(-1)


def _inputs(split: str, size: int) -> tuple[Tensor, Tensor]:
    x, y = digits(split)
    return to_model_input(torch.from_numpy(x), size, 1, imagenet=False), torch.from_numpy(y)


@functools.lru_cache(maxsize=4)
def digit_classifier(size: int) -> DigitClassifier:
    """The classifier for ``size`` x ``size`` images, trained on first use (about a second) and kept."""
    x, y = _inputs("train", size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = DigitClassifier(size)
        # a little pixel noise makes it read the slightly noisy samples of a small generator as digits too
        noise = torch.randn((4, *x.shape)) * 0.1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    with torch.enable_grad():  # first use may come from an evaluation under no_grad
        for step in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(model(x + noise[step % len(noise)]), y).backward()
            opt.step()
    model.eval().requires_grad_(False)
    tx, ty = _inputs("test", size)
    model.test_accuracy = float((model.predict(tx) == ty).float().mean())
    return model


def digit_classes(labels: list[str]) -> list[int] | None:
    """The classifier's class of each label ("0" .. "9"), or None when a label is not a digit."""
    if not all(label in DIGIT_LABELS for label in labels):
        return None
    return [DIGIT_LABELS.index(label) for label in labels]


def sample_accuracy(images: Tensor, classes: list[int]) -> float:
    """Fraction of ``images`` (N, C, H, W) in [-1, 1] that the classifier reads as ``classes`` (N digits)."""
    if len(images) != len(classes):
        raise ValueError(f"sample_accuracy: {len(images)} images but {len(classes)} classes")
    pred = digit_classifier(int(images.shape[-1])).predict(images)
    return float((pred == torch.tensor(classes)).float().mean())


MEASURE_SAMPLES = 40  # samples per evaluation, spread evenly over the prompts (at least one each)
MEASURE_SEED = 1  # start noise of the measured samples (the grids use seed 0)


def sample_scores(task: Any, model: nn.Module) -> dict[str, float]:
    """``sample_accuracy`` and ``sample_accuracy_adapter_off`` of a diffusion task's model: DDIM samples of the
    prompts of the classes in the training data (all labels', unless a class filter keeps fewer; ``task.cond`` row
    i goes with ``task.labels[i]``; ``MEASURE_SAMPLES`` in all), the same start noise with the adapter on and off. The adapter-off score is the base model's, which training never changes:
    it is computed once per task. Empty unless the training images are scikit-learn's digits."""
    classes = digit_classes(task.labels) if split_source(task.recipe.data.train)[0] in DIGITS_SOURCES else None
    if classes is None:
        return {}
    present = sorted(set(getattr(task, "train_y", []))) or list(range(len(classes)))  # a class-filtered source: its classes' prompts
    per_label = -(-MEASURE_SAMPLES // len(present))
    cond = task.cond[present]
    cond = cond.repeat(per_label, *[1] * (cond.dim() - 1))
    targets = [classes[k] for k in present] * per_label
    on = sample_accuracy(task.samples(model, cond, seed=MEASURE_SEED), targets)
    key = (len(targets), task.sample_steps)
    cache = task.__dict__.setdefault("_sample_scores_off", {})
    if key not in cache:
        with model.disable_adapter():
            cache[key] = sample_accuracy(task.samples(model, cond, seed=MEASURE_SEED), targets)
    return {"sample_accuracy": on, "sample_accuracy_adapter_off": cache[key]}
