"""``clip-tiny`` and ``clip-tiny-digits``: a tiny CLIP built from a config, and the same CLIP after a short
contrastive pre-training on real digit images (:class:`DigitsPretraining`), cached under ``$PEFTKIT_CACHE``.
The few-shot task that uses them: :mod:`peftkit.train.clip_fewshot`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .build_cache import PRETRAIN_RECORD, BuildSettings, cache_root, publish
from .data import DataError
from .images import DIGIT_LABELS, DIGITS_TEST, digits
from .packages import minilm_dir
from .state import lr_factor
from .task import quiet_transformers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TINY_DIGITS = "clip-tiny-digits"
DIGITS_SOURCES = ("builtin:digits", "builtin:digits/train", "builtin:digits/test")
PRETRAIN_VERSION = 1  # bump when the pre-training procedure changes: the cache key changes with it


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
class DigitsPretraining(BuildSettings):
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

    VERSION: ClassVar[int] = PRETRAIN_VERSION


DIGITS_PRETRAINING = DigitsPretraining()


def digits_rows(source: str) -> np.ndarray:
    """Row i of a ``builtin:digits`` source is image ``digits_rows(source)[i]`` of all 1,797 (file order);
    the same fixed permutation as :func:`peftkit.train.images.digits`."""
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


def clip_tiny_digits_path(settings: DigitsPretraining = DIGITS_PRETRAINING) -> Path:
    """Where the pre-trained model of ``settings`` is (or will be) cached."""
    return cache_root() / f"{CLIP_TINY_DIGITS}-{settings.key()}"


def is_built(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build (weights and the pre-training record)."""
    return (folder / "model.safetensors").is_file() and (folder / PRETRAIN_RECORD).is_file()


def clip_tiny_digits_dir(settings: DigitsPretraining = DIGITS_PRETRAINING) -> str:
    """The folder of ``clip-tiny-digits`` (a ``transformers`` CLIP with its tokenizer), pre-trained on first
    use and reused afterwards. Deterministic: the same settings give the same weights on one machine."""
    folder = clip_tiny_digits_path(settings)
    if is_built(folder):
        return str(folder)
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    with torch.random.fork_rng(devices=[]):
        model, record = pretrain_clip_tiny(tokenizer, settings)
    publish(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), record, is_built)
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
