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

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError
from .models import minilm_dir, resolve_model
from .tasks import _quiet_transformers, register_task
from .vision import DIGIT_LABELS, DIGITS_TEST, ImageClassification, digits

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TINY_DIGITS = "clip-tiny-digits"
PRETRAIN_RECORD = "peftkit_pretrain.json"
DIGITS_SOURCES = ("builtin:digits", "builtin:digits/train", "builtin:digits/test")
PRETRAIN_VERSION = 1  # bump when the pre-training procedure changes: the cache key changes with it


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


def clip_tiny(vocab_size: int, eos_token_id: int, pad_token_id: int, image_size: int) -> nn.Module:
    """A small random CLIP; the weights are a fixed function of its shape (seed 0)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, bos_token_id=eos_token_id),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPModel(config)


def clip_pixels(images: Tensor, size: int) -> Tensor:
    """uint8 grey images (N, H, W) -> CLIP pixel values (N, 3, size, size): bilinear resize, CLIP mean / std."""
    x = images.float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------ pre-trained tiny CLIP
@dataclasses.dataclass(frozen=True)
class DigitsPretraining:
    """How ``clip-tiny-digits`` is pre-trained: CLIP's contrastive loss on digit images and captions.

    Data: scikit-learn's digits train split (1,437; the 360 test images are never touched) is halved by a
    permutation seeded with ``seed``; the first half (``pool_fraction``) is the pre-training pool, the
    other half is where the few-shot stage draws its shots. Pre-training uses only the pool's images of
    ``classes``; the other classes' names never occur in a caption and their images are never shown (the
    "new" classes of CoCoOp's base-to-new setting). Each image is paired with a caption from ``templates``,
    none of which is the few-shot stage's prompt "a photo of a {}.". So the zero-shot classifier is good on
    the pre-training classes and at chance on the others, and the few-shot stage has something to learn.

    Loss: the symmetric InfoNCE of CLIP with every same-class pair of a batch counted as a positive (a
    batch of 64 from 7 classes holds many; one-positive InfoNCE would push them apart). AdamW, no weight
    decay, linear warm-up then cosine decay; batches drawn with replacement by a generator seeded with
    ``seed``; initial weights those of ``clip-tiny`` (seed 0).
    """

    classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    templates: tuple[str, ...] = ("a handwritten {}.", "the digit {}.", "a scan of the number {}.",
                                  "a drawing of a {}.", "the number {}, written by hand.")
    pool_fraction: float = 0.5
    image_size: int = 16
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup_ratio: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """A hash of everything the weights depend on (the settings and the procedure's version)."""
        blob = json.dumps({"version": PRETRAIN_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DIGITS_PRETRAINING = DigitsPretraining()


def digits_rows(source: str) -> np.ndarray:
    """Row i of a ``builtin:digits`` source is image ``digits_rows(source)[i]`` of all 1,797 (file order);
    the same fixed permutation as :func:`peftkit.train.vision.digits`."""
    n = len(digits()[1])
    if source not in DIGITS_SOURCES:
        raise DataError(f"{source}: not a digits source ({', '.join(DIGITS_SOURCES)})")
    if source == "builtin:digits":
        return np.arange(n)
    perm = np.random.default_rng(0).permutation(n)
    return {"builtin:digits/test": perm[:DIGITS_TEST], "builtin:digits/train": perm[DIGITS_TEST:]}[source]


def pretrain_pool(settings: DigitsPretraining = DIGITS_PRETRAINING) -> np.ndarray:
    """The pre-training half of the digits train split: sorted indices into all 1,797 images."""
    train = digits_rows("builtin:digits/train")
    order = np.random.default_rng(settings.seed).permutation(len(train))
    return np.sort(train[order[: int(len(train) * settings.pool_fraction)]])


def clip_contrastive_loss(logits_per_image: Tensor, labels: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (B, B) image-caption logit matrix; pairs of the same class are positives."""
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # symmetric, so it is also the caption -> image target
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target))


def pretrain_clip_tiny(tokenizer: Any, settings: DigitsPretraining = DIGITS_PRETRAINING) -> tuple[nn.Module, dict]:
    """``clip-tiny`` contrastively pre-trained as ``settings`` say; returns the model and its record."""
    from .state import lr_factor

    start = time.perf_counter()
    x_all, y_all = digits()
    pool = pretrain_pool(settings)
    seen = pool[np.isin(y_all[pool], settings.classes)]
    pixels = clip_pixels(torch.from_numpy(x_all[seen]), settings.image_size)
    labels = torch.from_numpy(y_all[seen])
    n_t = len(settings.templates)
    captions = [t.format(DIGIT_LABELS[c]) for c in settings.classes for t in settings.templates]
    enc = tokenizer(captions, padding=True, return_tensors="pt")  # caption of (class k, template t): k * n_t + t
    class_pos = torch.full((len(DIGIT_LABELS),), -1, dtype=torch.long)
    class_pos[list(settings.classes)] = torch.arange(len(settings.classes))
    model = clip_tiny(tokenizer.vocab_size, tokenizer.sep_token_id, tokenizer.pad_token_id, settings.image_size)
    model.train()
    try:  # fused: one kernel over the 2M-entry token embedding, 40% less time per step on a CPU
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused AdamW on the CPU
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    warmup = int(settings.warmup_ratio * settings.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings.steps, warmup, "cosine"))
    gen = torch.Generator().manual_seed(settings.seed)
    losses = []
    for _ in range(settings.steps):
        idx = torch.randint(len(labels), (settings.batch_size,), generator=gen)
        cap = class_pos[labels[idx]] * n_t + torch.randint(n_t, (settings.batch_size,), generator=gen)
        out = model(input_ids=enc["input_ids"][cap], attention_mask=enc["attention_mask"][cap],
                    pixel_values=pixels[idx])
        loss = clip_contrastive_loss(out.logits_per_image, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return model.eval(), {
        "model": CLIP_TINY_DIGITS, "key": settings.key(), "version": PRETRAIN_VERSION,
        "settings": dataclasses.asdict(settings),
        "source": "builtin:digits (scikit-learn load_digits); indices into all 1,797 images in file order",
        "pool": pool.tolist(), "pretrain_images": len(seen),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "build_seconds": round(time.perf_counter() - start, 1),
    }


def cache_root() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def clip_tiny_digits_path(settings: DigitsPretraining = DIGITS_PRETRAINING) -> Path:
    """Where the pre-trained model of ``settings`` is (or will be) cached."""
    return cache_root() / f"{CLIP_TINY_DIGITS}-{settings.key()}"


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / PRETRAIN_RECORD).is_file()


def clip_tiny_digits_dir(settings: DigitsPretraining = DIGITS_PRETRAINING) -> str:
    """The folder of ``clip-tiny-digits`` (a ``transformers`` CLIP with its tokenizer), pre-trained on first
    use and reused afterwards. Deterministic: the same settings give the same weights on one machine."""
    folder = clip_tiny_digits_path(settings)
    if _complete(folder):
        return str(folder)
    from transformers import AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    with torch.random.fork_rng(devices=[]):
        model, record = pretrain_clip_tiny(tokenizer, settings)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / PRETRAIN_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(folder):
            raise
    return str(folder)


def pretrain_record(model: str) -> dict[str, Any] | None:
    """What the recipe's model was pre-trained on (None when unknown): computed for ``clip-tiny-digits``
    without building it, else read from the folder's ``peftkit_pretrain.json``."""
    if model == CLIP_TINY_DIGITS:
        return {"model": model, "pool": pretrain_pool().tolist()}
    path = Path(model) / PRETRAIN_RECORD
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return None


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
            if r.model == CLIP_TINY_DIGITS and not _complete(clip_tiny_digits_path()):
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
        _quiet_transformers()
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
