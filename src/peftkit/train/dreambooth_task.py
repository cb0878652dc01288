"""``task: dreambooth``: DreamBooth-LoRA with prior preservation on a tiny text-conditioned UNet. The method,
the recipe section and the diffusers export: :mod:`peftkit.train.dreambooth`."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor, nn

from .data import DataError
from .diffusion import DiffusionTask, sample_images, save_grid
from .dreambooth import prior_preservation_loss, save_diffusers_files
from .images import load_images
from .placeholder import prompt_encoder
from .task import register_task
from .text_to_image import adapted_model


@register_task("dreambooth")
class DreamBoothTask(DiffusionTask):
    """Subject images with the instance prompt (+ class images with the class prompt); metric: test_loss
    (denoising MSE on the subject class's test images with the instance prompt)."""

    class_images: Tensor | None = None  # (num_class_images, C, H, W) in [-1, 1], model input

    def load_data(self) -> None:
        r, d = self.recipe, self.recipe.data
        db = r.dreambooth
        x, y, names = load_images(d.train, d.train_rows)
        if db.subject not in names:
            raise DataError(f"dreambooth.subject: {db.subject!r} is not a class of {d.train} ({names})")
        k = names.index(db.subject)
        keep = [i for i, label in enumerate(y) if label == k]
        if not keep:
            raise DataError(f"dreambooth.subject: {d.train} has no images of class {db.subject!r}")
        self.labels = [db.subject]
        self.class_names = names  # the class prompts' words: textual inversion's text encoder
        self.train_x, self.train_y = x[keep], [0] * len(keep)
        self._class_rows = x[[i for i, label in enumerate(y) if label != k]]
        self.test_x, self.test_y = None, []
        if d.test:
            tx, ty, _ = load_images(d.test, d.test_rows)
            tkeep = [i for i, label in enumerate(ty) if label == k]
            if tkeep:
                self.test_x, self.test_y = tx[tkeep], [0] * len(tkeep)
        self.n_train = len(keep)
        self._eval_cache = None

    def load_model(self) -> nn.Module:
        unet = self.base_unet()  # scheduler, image size
        db = self.recipe.dreambooth
        prior = db.prior
        prompts = [db.instance_prompt] + ([prior.class_prompt] if prior.with_prior_preservation else [])
        dim = int(unet.config.cross_attention_dim)
        self.encoder, self.prompts = prompt_encoder(self, prompts, dim, self.class_names)  # + a placeholder
        self.cond = self.encoder(self.prompts)  # row 0: instance prompt, row 1: class prompt
        if prior.with_prior_preservation and self.n_train:  # a loaded trained run (no data) needs no prior images
            self.class_images = self._class_images(unet)
        return adapted_model(self, unet)  # the UNet, or UNet + text encoder (recipe diffusion.adapt)

    def _class_images(self, unet: nn.Module) -> Tensor:
        """The prior images: the frozen base UNet's DDIM samples of the class prompt, or other classes' images."""
        prior = self.recipe.dreambooth.prior
        n = prior.num_class_images
        if prior.class_images_from == "data":
            if len(self._class_rows) < n:
                raise DataError(f"dreambooth.prior.num_class_images: {n}, but {self.recipe.data.train} has "
                                f"{len(self._class_rows)} images outside the subject class")
            return self._images(self._class_rows[:n])
        shape = (self.channels, self.image_size, self.image_size)
        return generate_class_images(unet, self.cond[1:2], n, shape, steps=prior.class_sample_steps,
                                     seed=prior.class_seed, batch_size=self.recipe.train.eval_batch_size)

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "class_names": self.class_names}

    def restore_info(self, info: dict[str, Any]) -> None:
        super().restore_info(info)
        self.class_names = list(info.get("class_names", self.labels))

    def batch(self, indices: list[int]) -> dict[str, Any]:
        x0 = self._images(self.train_x[indices])
        cond = self.cond[[0] * len(indices)]
        if self.class_images is not None:
            pr = self.class_images[[i % len(self.class_images) for i in indices]]
            x0, cond = torch.cat([x0, pr]), torch.cat([cond, self.cond[[1] * len(indices)]])
        noise = torch.randn(x0.shape)  # torch's global RNG: seeded and checkpointed by the trainer
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),))
        return {"sample": self._noisy(x0, noise, t), "timestep": t, "noise": noise,
                "encoder_hidden_states": cond, "n_instance": len(indices)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        pred = model(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"]).sample
        n = batch.get("n_instance", len(pred))
        return prior_preservation_loss(pred, batch["noise"], n, self.recipe.dreambooth.prior.prior_loss_weight)

    def finish(self, model: nn.Module, run_dir: str) -> None:
        """The adapter in diffusers' format (LoRA, textual inversion), the class images and sample grids (one
        column per prompt), adapter on/off."""
        save_diffusers_files(model, run_dir)
        if self.class_images is not None:
            save_grid(self.class_images, min(10, len(self.class_images)), os.path.join(run_dir, "class_images.png"))
        columns = len(self.prompts)
        save_grid(self.samples(model), columns, os.path.join(run_dir, "samples_adapter_on.png"))
        with model.disable_adapter():
            off = self.samples(model)
        save_grid(off, columns, os.path.join(run_dir, "samples_adapter_off.png"))


def generate_class_images(unet: nn.Module, class_cond: Tensor, n: int, shape: tuple[int, ...], *, steps: int,
                          seed: int, batch_size: int) -> Tensor:
    """``n`` DDIM samples of one prompt's embedding ``class_cond`` (1, L, D) from ``unet``, in batches; batch
    ``b`` starts from a generator seeded with ``seed + b``. With a PEFT model the adapter is disabled."""
    ctx = unet.disable_adapter() if hasattr(unet, "disable_adapter") else contextlib.nullcontext()
    out = []
    with ctx:
        for b, s in enumerate(range(0, n, batch_size)):
            cond = class_cond.expand(min(batch_size, n - s), -1, -1)
            out.append(sample_images(unet, cond, shape, steps=steps, seed=seed + b))
    return torch.cat(out)
