"""IP-Adapter training for ``peftkit train`` (``task: diffusion`` with ``method: ip_adapter``): the UNet learns which
digit to draw from an image prompt, another image of the same digit, under one uninformative text prompt.

Everything of :mod:`peftkit.train.diffusion` (DDPM noise prediction, scheduler, frozen prompt encoder, test loss),
except the conditioning: every image gets the text "a photo of a digit" (``TEXT_PROMPT``), and an image prompt,
the CLIP image embedding (``image_embeds``, frozen) of a *different* training image of the same class, drawn anew
each step from torch's global RNG (seeded and checkpointed by the trainer); with probability
``ip_adapter.image_dropout`` (recipe; default 0.05, the paper's) a row's image prompt is dropped, a zero embedding,
drawn from the same RNG, so the adapter also learns the unconditional prompt of classifier-free guidance. The
model is called as ``model(x_t, t, encoder_hidden_states=text, ip_adapter_image_embeds=e)``; the loss is
``MSE(eps_theta, eps)``.

Image encoder (``image_encoder``): ``clip-tiny-digits``, the project's tiny CLIP contrastively pre-trained on digit
images (:mod:`peftkit.train.clip_tiny`, built on first use and cached), or ``clip-tiny`` (the same CLIP with
random weights: for tests). Its embeddings of every image are computed once.

Metrics (every evaluation, so ``summary.json`` has them before and after training): ``test_loss``, the denoising
MSE on the test images, each with a fixed other test image of its class as the image prompt;
``test_loss_wrong_prompt``, the same with a test image of the next class as the prompt (the gap to ``test_loss`` is
what the model reads from the prompt's class); ``sample_accuracy``,
the fraction of DDIM samples (``samples_per_label`` per digit, image prompts: test images of that digit) that a
small digit classifier (:mod:`peftkit.train.diffusion_eval`) reads as the prompt's digit, and
``sample_accuracy_adapter_off``, the same samples with the adapter disabled (the text alone names no digit: chance).
The run folder gets ``samples_adapter_on.png`` / ``samples_adapter_off.png`` (one column per digit) and
``diffusers_ip_adapter/ip_adapter.safetensors`` (diffusers' ``load_ip_adapter`` format).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.ip_adapter import save_ip_adapter
from .clip_tiny import clip_pixels, clip_tiny, clip_tiny_digits_dir
from .diffusion import EVAL_SEED, METHOD_TASKS, DiffusionTask, sample_images, save_grid
from .diffusion_eval import digit_classes, sample_accuracy

TEXT_PROMPT = "a photo of a digit"
IMAGE_ENCODERS = ("clip-tiny-digits", "clip-tiny")
CLIP_SIZE = 16  # the tiny CLIPs' image size


def load_image_encoder(name: str) -> nn.Module:
    """The frozen CLIP whose ``get_image_features`` embeds the image prompts."""
    from transformers import CLIPModel

    if name == "clip-tiny-digits":
        model = CLIPModel.from_pretrained(clip_tiny_digits_dir())
    elif name == "clip-tiny":
        model = clip_tiny(vocab_size=8, eos_token_id=2, pad_token_id=0, image_size=CLIP_SIZE)
    else:
        raise ValueError(f"image encoder: expected one of {IMAGE_ENCODERS}, got {name!r}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def image_embeds(encoder: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """CLIP image embeddings (N, projection_dim) of uint8 grey images (N, H, W)."""
    out = []
    for s in range(0, len(images), batch_size):
        feats = encoder.get_image_features(pixel_values=clip_pixels(images[s : s + batch_size], CLIP_SIZE))
        out.append(feats if isinstance(feats, Tensor) else feats.pooler_output)
    return torch.cat(out)


def other_of_class(labels: list[int], generator: torch.Generator | None = None) -> Tensor:
    """For each row, a random other row of the same label (itself when it is its class's only row)."""
    y = torch.tensor(labels)
    out = torch.empty(len(y), dtype=torch.long)
    for k in y.unique().tolist():
        rows = (y == k).nonzero().squeeze(1)
        if len(rows) == 1:
            out[rows] = rows
            continue
        pick = torch.randint(0, len(rows) - 1, (len(rows),), generator=generator)
        pick = pick + (pick >= torch.arange(len(rows))).long()  # skip the row itself
        out[rows] = rows[pick]
    return out


def drop_image_prompts(embeds: Tensor, p: float) -> Tensor:
    """``embeds`` (N, D) with each row replaced by zeros with probability ``p`` (drawn from torch's global RNG,
    after everything else of the batch; ``p == 0`` draws nothing): the unconditional image prompt, as the IP-Adapter
    training script and diffusers' pipelines (``zeros_like`` of the image embedding) use it."""
    if not p:
        return embeds
    drop = torch.rand(len(embeds)) < p
    return torch.where(drop[:, None], torch.zeros_like(embeds), embeds)


class _Prompted(nn.Module):
    """The model with fixed image prompts, called as a plain UNet (``sample_images`` draws with it)."""

    def __init__(self, model: nn.Module, embeds: Tensor) -> None:
        super().__init__()
        self.model, self.embeds = model, embeds

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> Any:
        return self.model(x, t, encoder_hidden_states=encoder_hidden_states,
                          ip_adapter_image_embeds=self.embeds.to(x.device))


class IPAdapterDiffusionTask(DiffusionTask):
    """Denoising with an uninformative text prompt and a same-digit image prompt; metric: test_loss."""

    image_encoder = "clip-tiny-digits"
    samples_per_label = 4
    measure_seed = 1  # start noise of the sample_accuracy samples (the grids use sample_seed)

    def load_model(self) -> nn.Module:
        unet = self.base_unet()  # scheduler, image size, channels
        self.prompts = [TEXT_PROMPT]
        self.encoder = self.prompt_encoder(self.prompts, int(unet.config.cross_attention_dim))
        self.cond = self.encoder(self.prompts)  # (1, length, dim): every image's text
        clip = load_image_encoder(self.image_encoder)
        self.train_y, self.test_y = getattr(self, "train_y", []), getattr(self, "test_y", [])  # none: a loaded run
        self.train_embeds = image_embeds(clip, self.train_x) if self.n_train else None
        self.test_embeds = image_embeds(clip, self.test_x) if self.test_y else None
        rows = torch.tensor(self.train_y, dtype=torch.long)
        self._class_rows = {k: (rows == k).nonzero().squeeze(1) for k in range(len(self.labels))}
        return unet

    def batch(self, indices: list[int]) -> dict[str, Any]:
        x0 = self._images(self.train_x[indices])
        noise = torch.randn(x0.shape)  # torch's global RNG: seeded and checkpointed by the trainer
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(indices),))
        picks = []
        for i in indices:  # the image prompt: another training image of the same class, drawn from the same RNG
            rows = self._class_rows[self.train_y[i]]
            if len(rows) == 1:
                picks.append(i)
                continue
            r = int(torch.randint(0, len(rows) - 1, ()))
            picks.append(int(rows[r + int(r >= int((rows == i).nonzero()[0, 0]))]))
        return {"sample": self._noisy(x0, noise, t), "timestep": t, "noise": noise,
                "encoder_hidden_states": self.cond.expand(len(indices), -1, -1),
                "image_embeds": drop_image_prompts(self.train_embeds[picks], self.recipe.ip_adapter.image_dropout)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        pred = model(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"],
                     ip_adapter_image_embeds=batch["image_embeds"]).sample
        return F.mse_loss(pred.float(), batch["noise"].float())

    def _test_prompts(self, shift: int = 0) -> Tensor:
        """Each test image's image prompt: a fixed other test image of its class, or with ``shift`` of the class
        ``shift`` further on among the test images' classes (a wrong prompt, to see whether the image prompt's class
        is what the model reads)."""
        g = torch.Generator().manual_seed(EVAL_SEED)
        if not shift:
            return self.test_embeds[other_of_class(self.test_y, g)]
        y = torch.tensor(self.test_y)
        present = sorted(set(self.test_y))  # the test images' classes (a class filter may keep fewer than all)
        other = {c: present[(i + shift) % len(present)] for i, c in enumerate(present)}
        rows = [(y == other[int(c)]).nonzero().squeeze(1) for c in y]
        return self.test_embeds[[int(r[torch.randint(0, len(r), (), generator=g)]) if len(r) else i
                                 for i, r in enumerate(rows)]]

    def _test_loss(self, model: nn.Module, prompts: Tensor) -> float:
        noisy, noise, t = self._eval_set()
        bs, total = self.recipe.train.eval_batch_size, 0.0
        for s in range(0, len(t), bs):
            batch = self.move({"sample": noisy[s : s + bs], "timestep": t[s : s + bs], "noise": noise[s : s + bs],
                               "encoder_hidden_states": self.cond.expand(len(t[s : s + bs]), -1, -1),
                               "image_embeds": prompts[s : s + bs]})
            total += float(self.loss(model, batch)) * len(batch["timestep"])
        return total / len(t)

    def _sample_prompts(self) -> tuple[Tensor, list[int]]:
        """``samples_per_label`` test images of each class (in order), as image prompts, and their classes."""
        rows, classes = [], []
        for k in range(len(self.labels)):
            mine = [i for i, y in enumerate(self.test_y) if y == k][: self.samples_per_label]
            rows += mine
            classes += [k] * len(mine)
        return self.test_embeds[rows], classes

    def samples(self, model: nn.Module, cond: Tensor | None = None, seed: int | None = None,
                embeds: Tensor | None = None) -> Tensor:
        """DDIM samples of image prompts ``embeds`` (default: ``_sample_prompts``) under the text ``cond`` (default:
        the uninformative prompt, one row per image prompt)."""
        embeds = self._sample_prompts()[0] if embeds is None else embeds
        cond = self.cond.expand(len(embeds), -1, -1) if cond is None else cond
        return sample_images(_Prompted(model, embeds), cond, (self.channels, self.image_size, self.image_size),
                             steps=self.sample_steps, seed=self.sample_seed if seed is None else seed)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_y:
            return {}
        was_training = model.training
        model.eval()
        out = {"test_loss": self._test_loss(model, self._test_prompts()),
               "test_loss_wrong_prompt": self._test_loss(model, self._test_prompts(shift=1))}
        digits = digit_classes(self.labels)
        if digits is not None:
            embeds, classes = self._sample_prompts()
            want = [digits[k] for k in classes]
            out["sample_accuracy"] = sample_accuracy(self.samples(model, seed=self.measure_seed, embeds=embeds), want)
            with model.disable_adapter():
                off = self.samples(model, seed=self.measure_seed, embeds=embeds)
            out["sample_accuracy_adapter_off"] = sample_accuracy(off, want)
        model.train(was_training)
        return out

    def finish(self, model: nn.Module, run_dir: str) -> None:
        """Sample grids (rows: image prompts; one column per digit) with the adapter on and off, and the diffusers
        IP-Adapter file."""
        save_ip_adapter(model, os.path.join(run_dir, "diffusers_ip_adapter"))
        if not self.test_y:
            return
        embeds, classes = self._sample_prompts()
        order = sorted(range(len(classes)), key=lambda i: (i % self.samples_per_label, classes[i]))
        embeds = embeds[order]  # grid rows: the j-th prompt of every digit
        save_grid(self.samples(model, embeds=embeds), len(self.labels), os.path.join(run_dir, "samples_adapter_on.png"))
        with model.disable_adapter():
            off = self.samples(model, embeds=embeds)
        save_grid(off, len(self.labels), os.path.join(run_dir, "samples_adapter_off.png"))


METHOD_TASKS["ip_adapter"] = IPAdapterDiffusionTask
