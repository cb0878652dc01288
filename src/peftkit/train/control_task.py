"""``task: diffusion`` with a method that takes a conditioning image (ControlNet, T2I-Adapter; registered in
``diffusion.METHOD_TASKS``): a conditioning image per training image. The recipe section and the image transforms:
:mod:`peftkit.train.control`.

Everything else is task ``diffusion``'s (:mod:`peftkit.train.diffusion`): the UNet, prompts, noise, scheduler and
``test_loss`` (here with each test image's own conditioning image). Each batch also holds the conditioning images of
its clean images; the loss passes them through the method's argument (``controlnet_cond`` / ``adapter_cond``).

Evaluation adds ``control_agreement`` and ``control_agreement_adapter_off``: samples generated from the conditioning
images of ``AGREE_PER_LABEL`` test images per label (DDIM, the same start noise with the adapter on and off), scored by
:func:`peftkit.train.control.agreement`. Samples of a prompt take the conditioning images of test images of its label
(train images when there is no test split). After training, ``samples_adapter_on.png`` / ``samples_adapter_off.png``
alternate rows of conditioning images and the samples drawn from them (one column per label), and
``diffusers_controlnet/`` / ``diffusers_t2i_adapter/`` hold the trained network in diffusers' own folder format
(``ControlNetModel.from_pretrained`` / ``T2IAdapter.from_pretrained`` load it).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.controlnet.side import SideNetAdapter, active_side, side_adapter
from ..registry import get_method
from .control import agreement, condition_images, conditioned_methods, fit_to_adapter
from .diffusion import METHOD_TASKS, DiffusionTask, save_grid

AGREE_PER_LABEL = 4  # samples per label for control_agreement
AGREE_SEED = 2  # their start noise (the grids use seed 0, sample_accuracy seed 1)


class Controlled(nn.Module):
    """``model`` called with the conditioning images ``control`` on every call (for the DDIM sampler)."""

    def __init__(self, model: nn.Module, argument: str, control: Tensor) -> None:
        super().__init__()
        self.model, self.argument, self.control = model, argument, control

    def forward(self, sample: Tensor, timestep: Any, **kwargs: Any) -> Any:
        image = adapter_input(self.model, self.control, sample.shape)
        return self.model(sample, timestep, **kwargs, **{self.argument: image})


def adapter_input(model: nn.Module, control: Tensor, sample_shape: torch.Size) -> Tensor:
    """Gray conditioning images (N, 1, H, W) as the model's active side network reads them (its channels, its
    size); unchanged when none is active (the argument is then not used)."""
    unet = model.get_base_model() if hasattr(model, "get_base_model") else model
    active = active_side(unet)
    if not active:
        return control
    adapter = active[0][1]
    _, _, h, w = adapter.cond_shape(sample_shape)
    return fit_to_adapter(control, adapter.cond_channels, h // sample_shape[2]).to(control.device)


class ControlDiffusionTask(DiffusionTask):
    """Denoising with a conditioning image per image; metrics: test_loss, control agreement (adapter on / off)."""

    def load_model(self) -> nn.Module:
        self.argument = get_method(self.recipe.method).adapter_cls.cond_argument
        return super().load_model()

    def control_images(self, images: Tensor) -> Tensor:
        """Conditioning images (N, 1, H, W) in [0, 1] of raw images, at the task's image size."""
        return condition_images(self._images(images), self.recipe.control)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return {**super().batch(indices), "control": self.control_images(self.train_x[indices])}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        image = adapter_input(model, batch["control"], batch["sample"].shape)
        pred = model(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"],
                     **{self.argument: image}).sample
        return F.mse_loss(pred.float(), batch["noise"].float())

    def eval_inputs(self) -> dict[str, Tensor]:
        return {"control": self.control_images(self.test_x)}

    def extra_scores(self, model: nn.Module) -> dict[str, float]:
        return self.agreement(model)

    # -- samples ---------------------------------------------------------------------------------------------
    def controls_for(self, cond: Tensor) -> Tensor:
        """A conditioning image for each row of ``cond`` (rows of ``self.cond``): the k-th row of label i gets the
        k-th test image of label i (cycling; train images when there is no test split)."""
        images, labels = (self.test_x, self.test_y) if self.test_y else (self.train_x, self.train_y)
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_label.setdefault(int(y), []).append(i)
        seen: dict[int, int] = {}
        rows = []
        for row in cond:
            label = next(i for i in range(len(self.cond)) if torch.equal(self.cond[i], row))
            pool = by_label.get(label) or list(range(len(labels)))
            rows.append(pool[seen.get(label, 0) % len(pool)])
            seen[label] = seen.get(label, 0) + 1
        return self.control_images(images[rows])

    def samples(self, model: nn.Module, cond: Tensor | None = None, seed: int | None = None,
                control: Tensor | None = None) -> Tensor:
        """Samples of ``cond`` (default: the grid's), each drawn with its conditioning image (``control``; default:
        :meth:`controls_for`)."""
        if cond is None:
            cond = self.cond.repeat(self.samples_per_label, *[1] * (self.cond.dim() - 1))
        control = self.controls_for(cond) if control is None else control
        return super().samples(Controlled(model, self.argument, control), cond, seed)

    def agreement(self, model: nn.Module) -> dict[str, float]:
        """``control_agreement`` (adapter on) and ``control_agreement_adapter_off`` (computed once per task)."""
        cond = self.cond.repeat(AGREE_PER_LABEL, *[1] * (self.cond.dim() - 1))
        control = self.controls_for(cond)
        spec = self.recipe.control
        on = agreement(self.samples(model, cond, AGREE_SEED, control), control, spec)
        key = (len(cond), self.sample_steps)  # adapter off: the base model's, which training never changes
        cache = self.__dict__.setdefault("_agreement_off", {})
        if key not in cache:
            with model.disable_adapter():
                cache[key] = agreement(self.samples(model, cond, AGREE_SEED, control), control, spec)
        return {"control_agreement": on, "control_agreement_adapter_off": cache[key]}

    def finish(self, model: nn.Module, run_dir: str) -> None:
        """Sample grids, adapter on and off (a row of conditioning images above each row of samples), and the side
        network as diffusers' folder: ``diffusers_controlnet/`` / ``diffusers_t2i_adapter/``."""
        cond = self.cond.repeat(self.samples_per_label, *[1] * (self.cond.dim() - 1))
        control = self.controls_for(cond)
        shown = (control * 2 - 1).expand(-1, self.channels, -1, -1)  # [0, 1] -> the samples' [-1, 1]
        columns = len(self.labels)
        on = self.samples(model, cond, control=control)
        with model.disable_adapter():
            off = self.samples(model, cond, control=control)
        for name, images in (("on", on), ("off", off)):
            save_grid(interleave_rows(shown, images, columns), columns,
                      os.path.join(run_dir, f"samples_adapter_{name}.png"))
        adapter = side_adapter(model, "default", SideNetAdapter)  # diffusers' own folder (from_pretrained loads it)
        adapter.net.save_pretrained(os.path.join(run_dir, f"diffusers_{adapter.file_prefix}"))


def interleave_rows(first: Tensor, second: Tensor, columns: int) -> Tensor:
    """Rows of ``columns`` images taken in turn from ``first`` and ``second`` (same shapes)."""
    rows = []
    for s in range(0, len(first), columns):
        rows += [first[s : s + columns], second[s : s + columns]]
    return torch.cat(rows)


METHOD_TASKS.update(dict.fromkeys(conditioned_methods(), ControlDiffusionTask))
