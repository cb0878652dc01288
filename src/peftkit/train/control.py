"""The recipe's ``control:`` section (``task: diffusion`` with a method that takes a conditioning image: ControlNet,
T2I-Adapter): the conditioning image each training image gets, and how well generated samples follow it.

The image is derived from the training image itself (scikit-learn's digits, or any image source), gray, in [0, 1],
at the task's image size:

- ``sobel``: the edge magnitude ``sqrt(G_x^2 + G_y^2)`` of the image's Sobel gradients, divided by its maximum;
- ``blur``: the image blurred by a Gaussian of ``control.blur_sigma`` pixels.

The method gets it through its conditioning argument (ControlNet's ``controlnet_cond``, T2I-Adapter's
``adapter_cond``), repeated to the adapter's ``conditioning_channels`` and resized to its ``downscale`` factor
(:func:`fit_to_adapter`).

Whether the adapter learned its job: :func:`agreement` is the mean Pearson correlation, per image, between the
conditioning image and the same transform of the sample generated from it (a sample that follows the edges of its
control image has its edges where they are). The task reports it with the adapter on and off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import get_method, list_methods

CONDITIONS = ("sobel", "blur")
TASK = "diffusion"


@dataclass
class ControlSpec:
    """The recipe's ``control:`` section (read by ``task: diffusion`` with a conditioned method only)."""

    condition: str = "sobel"  # sobel (edge map) or blur (a blurred copy)
    blur_sigma: float = 1.0  # blur: the Gaussian's standard deviation in pixels


def conditioned_methods() -> list[str]:
    """Registered methods that take a conditioning image (their adapter names a ``cond_argument``)."""
    return [s.name for s in list_methods() if getattr(s.adapter_cls, "cond_argument", "")]


def control_problem(recipe: Any) -> str | None:
    """What is wrong with the ``control:`` fields (led by the dotted YAML path), or None."""
    spec = recipe.control
    try:
        conditioned = bool(getattr(get_method(recipe.method).adapter_cls, "cond_argument", ""))
    except KeyError:
        return None  # reported as the method field's error
    if recipe.task != TASK or not conditioned:
        if spec != ControlSpec():
            return (f"control: read by task {TASK} with a method that takes a conditioning image "
                    f"({', '.join(conditioned_methods())}); got task {recipe.task}, method {recipe.method}")
        return None
    if spec.condition not in CONDITIONS:
        return f"control.condition: expected one of {', '.join(CONDITIONS)}, got {spec.condition!r}"
    if not math.isfinite(spec.blur_sigma) or spec.blur_sigma <= 0:
        return f"control.blur_sigma: expected a finite number > 0, got {spec.blur_sigma}"
    adapt = getattr(getattr(recipe, "diffusion", None), "adapt", ["unet"])
    if list(adapt) != ["unet"]:
        return f"diffusion.adapt: method {recipe.method} rides the UNet alone; expected [unet], got {adapt}"
    return None


# -- the conditioning images (pure functions on tensors) ---------------------------------------------------------
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def gray01(images: Tensor) -> Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, 1, H, W) gray in [0, 1]."""
    return ((images.float().mean(1, keepdim=True) + 1) / 2).clamp(0, 1)


def sobel(images: Tensor) -> Tensor:
    """Edge maps (N, 1, H, W) in [0, 1] of images in [-1, 1]: Sobel gradient magnitude over its per-image maximum."""
    x = F.pad(gray01(images), (1, 1, 1, 1), mode="replicate")
    kernels = torch.stack([SOBEL_X, SOBEL_X.T]).unsqueeze(1).to(x)
    g = F.conv2d(x, kernels)
    mag = g.pow(2).sum(1, keepdim=True).sqrt()
    return mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)


def blur(images: Tensor, sigma: float) -> Tensor:
    """Gray images (N, 1, H, W) in [0, 1] blurred by a Gaussian of ``sigma`` pixels (separable, edges replicated)."""
    radius = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(images.device)
    x = F.pad(gray01(images), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def condition_images(images: Tensor, spec: ControlSpec) -> Tensor:
    """The conditioning images (N, 1, H, W) in [0, 1] of images (N, C, H, W) in [-1, 1]."""
    return sobel(images) if spec.condition == "sobel" else blur(images, spec.blur_sigma)


def fit_to_adapter(control: Tensor, channels: int, factor: int) -> Tensor:
    """Gray conditioning images (N, 1, H, W) as an adapter reads them: ``channels`` copies, ``factor`` times the size
    (bilinear)."""
    if factor != 1:
        control = F.interpolate(control, scale_factor=factor, mode="bilinear", align_corners=False)
    return control.expand(-1, channels, -1, -1).contiguous()


def agreement(samples: Tensor, control: Tensor, spec: ControlSpec) -> float:
    """Mean over images of the Pearson correlation between ``control`` (N, 1, H, W) and the same transform of the
    generated ``samples`` (N, C, H, W) in [-1, 1]; 0 for an image where either is constant."""
    a = condition_images(samples, spec).flatten(1).cpu()
    b = control.float().flatten(1).cpu()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = torch.where(den > 1e-12, (a * b).sum(1) / den.clamp_min(1e-12), torch.zeros_like(den))
    return float(r.mean())
