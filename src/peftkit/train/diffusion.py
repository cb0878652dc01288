"""Text-to-image diffusion LoRA for ``peftkit train`` (task ``diffusion``).

The adapted model is a diffusers ``UNet2DConditionModel`` trained as a DDPM noise predictor: for a clean
image ``x0``, noise ``eps`` and a timestep ``t`` (both drawn from torch's global RNG, which the trainer seeds
and checkpoints, so runs are reproducible and resume exactly), the loss is ``MSE(unet(x_t, t, text), eps)``
with ``x_t`` from a ``DDPMScheduler`` (1,000 steps, cosine schedule). The metric is ``test_loss``: the same
MSE on the held-out images at timesteps and noise fixed by a private generator (lower is better).

Images come from the image sources of :mod:`peftkit.train.vision` (``builtin:digits/train`` ...), resized
to ``data.image_size`` and scaled to [-1, 1]; each label becomes a prompt ("a photo of the digit three").

Text conditioning: a frozen 2-layer ``CLIPTextModel`` built from a config, with fixed random weights (seed 0)
and a word-level tokenizer (the ``tokenizers`` library) over the prompts' words; nothing is downloaded. A
random frozen encoder is enough here: it maps each prompt to a fixed, distinct sequence of vectors that the
UNet's cross-attention learns to read. The prompts are encoded once; a batch picks its rows.

Models (``model``): ``unet-tiny``, a small UNet with cross-attention built from a config with fixed random
weights (seed 0); ``unet-tiny-digits``, the same UNet pre-trained on the digits 0-4 (:mod:`peftkit.train.unet_digits`),
whose folder also holds the prompt encoder it was trained with, which the task then uses; or a local folder holding a
``UNet2DConditionModel`` (or a pipeline folder with ``unet/``). The model pieces: :mod:`peftkit.train.diffusion_models`.

After training, :meth:`DiffusionTask.finish` renders a grid of DDIM samples (one column per label) with the
adapter on and off: ``samples_adapter_on.png`` and ``samples_adapter_off.png`` in the run folder.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError
from .diffusion_eval import sample_scores
from .diffusion_models import (SCHEDULER, PromptEncoder, has_prompt_encoder, load_unet, prompt_for, sample_images,
                               unet_tiny)  # PromptEncoder, sample_images, unet_tiny: also imported from here
from .images import load_images, to_model_input
from .models import BUILTIN, resolve_model
from .task import Task, register_task
from .text_to_image import TextToImage, adapted_model

EVAL_SEED = 1234  # noise and timesteps of the test loss


def save_grid(images: Tensor, columns: int, path: str) -> tuple[int, int]:
    """Save (N, C, H, W) images in [-1, 1] as one PNG, ``columns`` per row; returns (width, height)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.full((c, rows * h, columns * w), -1.0)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = img
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = pixels[0].numpy() if c == 1 else pixels[:3].permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return columns * w, rows * h


class DiffusionTask(Task):
    """DDPM noise-prediction training of a text-conditioned UNet; metric: test_loss (denoising MSE)."""

    main_metric = "test_loss"
    higher_is_better = False
    labels: list[str] | None = None
    sample_steps = 20  # DDIM steps of the sample grids
    samples_per_label = 4  # grid rows
    sample_seed = 0

    def load_data(self) -> None:
        d = self.recipe.data
        self.train_x, self.train_y, names = load_images(d.train, d.train_rows)
        if self.labels is not None and self.labels != names:
            raise DataError(f"{d.train}: its classes {names} are not the run's labels {self.labels}")
        self.labels = names
        self.test_x, self.test_y = None, []
        if d.test:
            self.test_x, self.test_y, test_names = load_images(d.test, d.test_rows)
            if test_names != names:
                raise DataError(f"{d.test}: its classes {test_names} differ from {d.train}'s {names}")
        self.n_train = len(self.train_y)
        self._eval_cache: tuple[Tensor, Tensor, Tensor] | None = None

    def load_model(self) -> nn.Module:
        unet = self.base_unet()
        self.prompts = [prompt_for(name) for name in self.labels]
        self.encoder = self.prompt_encoder(self.prompts, int(unet.config.cross_attention_dim))
        self.cond = self.encoder(self.prompts)  # (num_labels, length, dim), fixed for the run
        return adapted_model(self, unet)  # the UNet, or UNet + text encoder (recipe diffusion.adapt)

    def base_unet(self) -> nn.Module:
        """The base UNet; sets the image size, channels and the DDPM scheduler."""
        from diffusers import DDPMScheduler

        r = self.recipe
        self.base_folder = None
        if r.model == "unet-tiny":
            unet = unet_tiny(r.data.image_size or 16)
        else:
            if r.model in BUILTIN and r.model.startswith("unet-"):
                self.notes.append(f"{r.model}: built-in base, pre-trained once on first use and cached")
            self.base_folder = resolve_model(r.model)
            unet = load_unet(self.base_folder)
        self.image_size = r.data.image_size or int(unet.config.sample_size)
        self.channels = int(unet.config.in_channels)
        self.scheduler = DDPMScheduler(**SCHEDULER)
        return unet

    def prompt_encoder(self, prompts: list[str], hidden_size: int, length: int | None = None) -> PromptEncoder:
        """The run's frozen text encoder: the one the base was trained with when its folder holds it
        (``unet-tiny-digits``), with ``prompts``' new words added; else a seed-0 encoder over ``prompts``' words."""
        if has_prompt_encoder(getattr(self, "base_folder", None)):
            return PromptEncoder.saved(self.base_folder, prompts)
        return PromptEncoder(prompts, hidden_size, length)

    def _images(self, images: Tensor) -> Tensor:
        return to_model_input(images, self.image_size, self.channels, imagenet=False)

    def _noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        x0 = self._images(self.train_x[indices])
        noise = torch.randn(x0.shape)  # torch's global RNG: seeded and checkpointed by the trainer
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(indices),))
        return {"sample": self._noisy(x0, noise, t), "timestep": t, "noise": noise,
                "encoder_hidden_states": self.cond[[self.train_y[i] for i in indices]]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        pred = model(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"]).sample
        return F.mse_loss(pred.float(), batch["noise"].float())

    def _eval_set(self) -> tuple[Tensor, Tensor, Tensor]:
        """Noisy test images, their noise and timesteps, drawn once from a private generator."""
        if self._eval_cache is None:
            g = torch.Generator().manual_seed(EVAL_SEED)
            x0 = self._images(self.test_x)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=g)
            self._eval_cache = (self._noisy(x0, noise, t), noise, t)
        return self._eval_cache

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_y:
            return {}
        was_training = model.training
        model.eval()
        noisy, noise, t = self._eval_set()
        extra = self.eval_inputs()
        bs, total = self.recipe.train.eval_batch_size, 0.0
        for s in range(0, len(t), bs):
            batch = self.move({"sample": noisy[s : s + bs], "timestep": t[s : s + bs], "noise": noise[s : s + bs],
                               "encoder_hidden_states": self.cond[self.test_y[s : s + bs]],
                               **{k: v[s : s + bs] for k, v in extra.items()}})
            total += float(self.loss(model, batch)) * len(batch["timestep"])
        model.train(was_training)
        # the digit classifier's scores with the adapter on / off, then the subclass's own
        return {"test_loss": total / len(t), **sample_scores(self, model), **self.extra_scores(model)}

    def eval_inputs(self) -> dict[str, Tensor]:
        """Batch entries beyond the noisy test images, one row per test image (a subclass's conditioning)."""
        return {}

    def extra_scores(self, model: nn.Module) -> dict[str, float]:
        """A subclass's own evaluation measures, after the test loss and the sample scores."""
        return {}

    def samples(self, model: nn.Module, cond: Tensor | None = None, seed: int | None = None) -> Tensor:
        """Samples of ``cond`` (rows of ``self.cond``), by default a grid's worth: ``samples_per_label`` rows, one
        column per label."""
        if cond is None:
            cond = self.cond.repeat(self.samples_per_label, *[1] * (self.cond.dim() - 1))  # hidden states or ids
        return sample_images(model, cond, (self.channels, self.image_size, self.image_size),
                             steps=self.sample_steps, seed=self.sample_seed if seed is None else seed)

    def finish(self, model: nn.Module, run_dir: str) -> None:
        """Write ``samples_adapter_on.png`` and ``samples_adapter_off.png`` (same seed, same noise)."""
        save_grid(self.samples(model), len(self.labels), os.path.join(run_dir, "samples_adapter_on.png"))
        with model.disable_adapter():
            off = self.samples(model)
        save_grid(off, len(self.labels), os.path.join(run_dir, "samples_adapter_off.png"))

    def save_merged(self, merged: nn.Module, out: str) -> None:
        """``peftkit merge``: the merged model as a pipeline-style folder that a recipe's ``model: OUT`` reads back
        (``load_unet`` and the saved prompt encoder): ``unet/`` (a ``UNet2DConditionModel``), ``text_encoder/`` (a
        ``CLIPTextModel``: with ``diffusion.adapt`` holding ``text_encoder``, its merged weights; else the run's
        frozen one) and ``tokenizer.json``. The run's text encoder is saved in every case: a base such as
        ``unet-tiny-digits`` brings its own, which the UNet's folder alone would lose."""
        unet = merged.unet if isinstance(merged, TextToImage) else merged
        if isinstance(merged, TextToImage):
            self.encoder.model = merged.text_encoder  # the merged encoder (the module the run's encoder held)
        os.makedirs(out, exist_ok=True)
        unet.save_pretrained(os.path.join(out, "unet"))
        self.encoder.save(out)

    def run_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])


# A method whose recipes condition on more than the text (IP-Adapter's image prompts) trains under task diffusion
# through its own DiffusionTask subclass: method name -> subclass, filled by the module defining it (tasks.py imports it)
METHOD_TASKS: dict[str, type[DiffusionTask]] = {}


@register_task("diffusion")
def diffusion_task(recipe: Any) -> DiffusionTask:
    """The task of a ``task: diffusion`` recipe: its method's own subclass, or ``DiffusionTask``."""
    return METHOD_TASKS.get(recipe.method, DiffusionTask)(recipe)
