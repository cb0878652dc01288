"""``unet-tiny-digits``: the tiny text-conditioned UNet (``unet-tiny``) trained in full as a DDPM on part of
scikit-learn's digits, so the diffusion recipes adapt a generator that already draws digits. Built once on first
use and cached under ``$PEFTKIT_CACHE`` as a pipeline-like folder: ``unet/`` (a diffusers
``UNet2DConditionModel``), ``text_encoder/`` and ``tokenizer.json`` (the frozen prompt encoder it was trained
with, which the tasks then use: :meth:`peftkit.train.diffusion_models.PromptEncoder.saved`) and
``peftkit_pretrain.json`` (the settings, the final loss and the base's own sample accuracy per prompt).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .build_cache import PRETRAIN_RECORD, BuildSettings, cache_root, publish
from .diffusion_eval import digit_classifier
from .diffusion_models import SCHEDULER, PromptEncoder, prompt_for, sample_images, unet_tiny
from .images import DIGIT_LABELS, digits, to_model_input
from .state import lr_factor

UNET_TINY_DIGITS = "unet-tiny-digits"
PRETRAIN_VERSION = 1  # bump when the pre-training procedure changes: the cache key changes with it


@dataclasses.dataclass(frozen=True)
class UNetDigitsPretraining(BuildSettings):
    """How ``unet-tiny-digits`` is pre-trained: DDPM noise prediction (``SCHEDULER``: 1,000 steps, cosine) of all
    of ``unet-tiny``'s parameters (seed-0 start) on the digits train split's images of ``classes`` (the 360 test
    images are never touched), at ``image_size`` px in [-1, 1].

    Text: each image's prompt is "a photo of the digit <word>", or with probability ``uncond_prob`` the
    uninformative ``uncond_prompt`` (classifier-free-guidance-style dropout: for it the base draws *some* digit of
    ``classes``). The frozen prompt encoder (seed-0 tiny CLIP, ``prompt_length`` positions) knows the words of all
    ten digits' prompts, but the UNet never sees the other classes' prompts or images: fine-tuning recipes teach
    them. AdamW (no weight decay), linear warm-up then cosine decay, gradient norm clipped at 1; the saved
    weights are an exponential moving average (``ema_decay``) of the trained ones. Batches, noise, timesteps and
    prompt dropout come from one generator seeded with ``seed``. ``check_samples`` DDIM samples (``check_steps``
    steps, seed 1) per prompt are scored by the digit classifier of :mod:`peftkit.train.diffusion_eval` and kept
    in the record.
    """

    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    uncond_prompt: str = "a photo of a digit"
    uncond_prob: float = 0.2
    image_size: int = 8
    prompt_length: int = 10
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_ratio: float = 0.02
    ema_decay: float = 0.995
    seed: int = 0
    check_samples: int = 40
    check_steps: int = 20

    VERSION: ClassVar[int] = PRETRAIN_VERSION


UNET_DIGITS_PRETRAINING = UNetDigitsPretraining()


def base_prompts(settings: UNetDigitsPretraining) -> list[str]:
    """The prompt encoder's prompts: every digit's prompt, then the uninformative one."""
    return [prompt_for(label) for label in DIGIT_LABELS] + [settings.uncond_prompt]


def pretrain_unet_digits(settings: UNetDigitsPretraining = UNET_DIGITS_PRETRAINING
                         ) -> tuple[nn.Module, PromptEncoder, dict[str, Any]]:
    """``unet-tiny`` pre-trained as ``settings`` say, its prompt encoder and its record."""
    start = time.perf_counter()
    x_all, y_all = digits("train")
    keep = np.isin(y_all, settings.classes)
    x, y = x_all[keep], y_all[keep]
    pixels = to_model_input(torch.from_numpy(x), settings.image_size, 1, imagenet=False)
    labels = torch.from_numpy(y)
    encoder = PromptEncoder(base_prompts(settings), 32, length=settings.prompt_length)
    table = encoder(base_prompts(settings))  # rows 0..9: digits, row 10: uninformative
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**SCHEDULER)
    model = unet_tiny(settings.image_size, 1, 32).train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    warmup = int(settings.warmup_ratio * settings.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings.steps, warmup, "cosine"))
    gen = torch.Generator().manual_seed(settings.seed)
    losses = []
    for _ in range(settings.steps):
        idx = torch.randint(len(labels), (settings.batch_size,), generator=gen)
        x0 = pixels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < settings.uncond_prob
        rows = torch.where(drop, torch.full_like(idx, len(DIGIT_LABELS)), labels[idx])
        pred = model(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=table[rows]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1 - settings.ema_decay)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    model.eval()
    tail = losses[-100:]
    return model, encoder, {
        "model": UNET_TINY_DIGITS, "key": settings.key(), "version": PRETRAIN_VERSION,
        "settings": dataclasses.asdict(settings), "prompts": base_prompts(settings),
        "source": "builtin:digits/train (scikit-learn load_digits, the 1,437-image train split) of the classes above",
        "pretrain_images": len(labels), "final_loss": round(sum(tail) / len(tail), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
        "sample_check": sample_check(model, table, settings),
    }


def sample_check(unet: nn.Module, table: torch.Tensor, settings: UNetDigitsPretraining) -> dict[str, Any]:
    """The base's own samples read by the digit classifier: per digit prompt the share read as its digit, and
    for the uninformative prompt how often each digit is read."""
    n = settings.check_samples
    shape = (1, settings.image_size, settings.image_size)
    classifier = digit_classifier(settings.image_size)
    accuracy = {}
    for k, label in enumerate(DIGIT_LABELS):
        samples = sample_images(unet, table[k : k + 1].expand(n, -1, -1), shape, steps=settings.check_steps, seed=1)
        accuracy[label] = round(float((classifier.predict(samples) == k).float().mean()), 3)
    samples = sample_images(unet, table[-1:].expand(n, -1, -1), shape, steps=settings.check_steps, seed=1)
    counts = torch.bincount(classifier.predict(samples), minlength=len(DIGIT_LABELS)).tolist()
    return {"samples_per_prompt": n, "ddim_steps": settings.check_steps, "seed": 1, "accuracy": accuracy,
            "uncond_prompt_reads_as": dict(zip(DIGIT_LABELS, counts))}


def unet_tiny_digits_path(settings: UNetDigitsPretraining = UNET_DIGITS_PRETRAINING) -> Path:
    """Where the pre-trained base of ``settings`` is (or will be) cached."""
    return cache_root() / f"{UNET_TINY_DIGITS}-{settings.key()}"


def is_built(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build (UNet, prompt encoder and the record)."""
    return all((folder / f).is_file() for f in ("unet/config.json", "text_encoder/config.json", "tokenizer.json",
                                                 PRETRAIN_RECORD))


def save_unet_digits(folder: Path, model: nn.Module, encoder: PromptEncoder, record: dict[str, Any]) -> None:
    """Write the build into ``folder`` at once (``build_cache.publish``): the UNet, the prompt encoder, the record."""
    publish(folder, lambda tmp: (model.save_pretrained(tmp / "unet"), encoder.save(str(tmp))), record, is_built)


def unet_tiny_digits_dir(settings: UNetDigitsPretraining = UNET_DIGITS_PRETRAINING) -> str:
    """The folder of ``unet-tiny-digits``, pre-trained on first use (a few minutes on one core) and reused
    afterwards. Deterministic: the same settings give the same weights on one machine."""
    folder = unet_tiny_digits_path(settings)
    if not is_built(folder):
        with torch.random.fork_rng(devices=[]):
            model, encoder, record = pretrain_unet_digits(settings)
        save_unet_digits(folder, model, encoder, record)
    return str(folder)
