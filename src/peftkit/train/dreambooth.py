"""DreamBooth with prior preservation (Ruiz et al. 2022, arXiv 2208.12242) for ``peftkit train`` (task
``dreambooth``): LoRA on a text-conditioned diffusers UNet learns one subject from a few images while a
prior-preservation term keeps what the base model draws for the subject's class.

The subject set is the training images of one class of ``data.train`` (``dreambooth.subject``, e.g. the
digit ``"3"``), all captioned with ``dreambooth.instance_prompt`` ("a photo of sks digit"). With
``dreambooth.prior.with_prior_preservation``, ``dreambooth.prior.num_class_images`` class images captioned
with ``dreambooth.prior.class_prompt`` ("a photo of a digit") are either generated before training by the
frozen base UNet (DDIM, ``class_sample_steps`` steps, start noise from a generator seeded with
``class_seed``; the adapter does not exist yet, so this is the base pipeline) or, with
``class_images_from: data``, taken from the other classes' training images. Per step, for subject images
``x`` and class images ``x_pr`` (class image ``i mod num_class_images`` goes with subject example ``i``, as
in diffusers' ``train_dreambooth_lora.py``), both noised with their own noise at their own timesteps and run
through the UNet in one batch (subject rows first)::

    loss = MSE(eps_theta(x_t, t, c_instance), eps) + prior_loss_weight * MSE(eps_theta(x_pr_t, t', c_class), eps')

(each MSE a mean over its own rows; ``prior_loss_weight`` is lambda in the paper's eq. 2). The noise,
timesteps, prompt encoder, scheduler and metric (``test_loss``: the denoising MSE on the test images of
the subject class with the instance prompt) are those of :mod:`peftkit.train.diffusion`.

After training the run folder also holds ``diffusers_lora/pytorch_lora_weights.safetensors``: the UNet's
LoRA (and the text encoder's, with ``diffusion.adapt: [unet, text_encoder]``) as diffusers' loader reads it
(``get_peft_model_state_dict`` keys, ``lora_A`` / ``lora_B``, under ``unet.`` / ``text_encoder.``, written by
``StableDiffusionLoraLoaderMixin.save_lora_weights`` with the LoRA config as adapter metadata), which
``StableDiffusionPipeline.load_lora_weights(folder)`` loads. The keys stay in peft's naming: diffusers'
``convert_state_dict_to_diffusers`` renames only attention projections (``to_k.lora.down``), and its UNet loader
decides the naming of the whole file from the first key, so a file mixing both (LoRA on convolutions or
``proj_in`` too) would load without its attention LoRA; ``class_images.png`` (the prior images) and
sample grids (instance prompt, class prompt) with the adapter on and off. Loading needs Hugging Face ``peft``
(diffusers' LoRA backend) importable. A textual-inversion run writes ``diffusers_textual_inversion/`` instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.lora import LoraConfig
from ..methods.textual_inversion import TextualInversionConfig, save_textual_inversion
from ..model import get_peft_model_state_dict
from .text_to_image import TextToImage

CLASS_SOURCES = ("generate", "data")
LORA_METADATA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                        "rank_pattern", "alpha_pattern", "init_lora_weights")


@dataclass
class PriorSpec:
    """The recipe's ``dreambooth.prior:`` section (diffusers' ``--with_prior_preservation`` flags)."""

    with_prior_preservation: bool = False
    class_prompt: str | None = None  # e.g. "a photo of a digit"; required with prior preservation
    num_class_images: int = 100
    prior_loss_weight: float = 1.0  # lambda of the paper's eq. 2
    class_images_from: str = "generate"  # "generate" (frozen base UNet, DDIM) or "data" (the other classes)
    class_sample_steps: int = 20  # DDIM steps per generated class image
    class_seed: int = 0  # generator seed of the class images' start noise


@dataclass
class DreamBoothSpec:
    """The recipe's ``dreambooth:`` section (read by ``task: dreambooth`` only)."""

    subject: str = "3"  # the class of data.train whose images are the subject set
    instance_prompt: str = "a photo of sks digit"
    prior: PriorSpec = field(default_factory=PriorSpec)


def dreambooth_problem(recipe: Any) -> str | None:
    """What is wrong with the ``dreambooth:`` fields, led by the dotted YAML path; None when nothing is
    (``recipe.py`` raises it as a RecipeError before any model loads)."""
    d = recipe.dreambooth
    if recipe.task != "dreambooth":
        if d != DreamBoothSpec():
            return f"dreambooth: only task dreambooth reads it (task {recipe.task})"
        return None
    if not d.subject.strip():
        return "dreambooth.subject: expected the name of a class of data.train, got ''"
    if not d.instance_prompt.strip():
        return "dreambooth.instance_prompt: expected a prompt naming the subject, got ''"
    p = d.prior
    if not p.with_prior_preservation:
        return None
    if p.class_prompt is None or not p.class_prompt.strip():
        return ("dreambooth.prior.class_prompt: prior preservation (dreambooth.prior.with_prior_preservation: "
                f"true) needs the class prompt, e.g. 'a photo of a digit'; got {p.class_prompt!r}")
    if p.class_prompt.split() == d.instance_prompt.split():
        return "dreambooth.prior.class_prompt: equals dreambooth.instance_prompt; the class prompt omits the identifier"
    if p.num_class_images <= 0:
        return f"dreambooth.prior.num_class_images: expected a positive integer, got {p.num_class_images}"
    if not math.isfinite(p.prior_loss_weight) or p.prior_loss_weight < 0:
        return f"dreambooth.prior.prior_loss_weight: expected a finite number >= 0, got {p.prior_loss_weight}"
    if p.class_images_from not in CLASS_SOURCES:
        return (f"dreambooth.prior.class_images_from: expected one of {', '.join(CLASS_SOURCES)}, "
                f"got {p.class_images_from!r}")
    if p.class_sample_steps <= 0:
        return f"dreambooth.prior.class_sample_steps: expected a positive integer, got {p.class_sample_steps}"
    return None


def prior_preservation_loss(pred: Tensor, noise: Tensor, n_instance: int, prior_loss_weight: float) -> Tensor:
    """``MSE(pred[:n], noise[:n]) + prior_loss_weight * MSE(pred[n:], noise[n:])`` (rows: subject, then class);
    with no class rows, the subject MSE alone."""
    pred, noise = pred.float(), noise.float()
    loss = F.mse_loss(pred[:n_instance], noise[:n_instance])
    if pred.shape[0] > n_instance:
        loss = loss + prior_loss_weight * F.mse_loss(pred[n_instance:], noise[n_instance:])
    return loss


def diffusers_lora_state_dict(model: nn.Module) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The LoRA of a peftkit model as diffusers' loader reads it, by component (``unet``, and ``text_encoder`` when the
    recipe's ``diffusion.adapt`` names it; keys without the component prefix, which ``save_lora_weights`` adds),
    and the LoRA config fields diffusers rebuilds a ``LoraConfig`` from."""
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    parts: dict[str, dict[str, Tensor]] = {}
    if not isinstance(model.get_base_model(), TextToImage):
        parts["unet"] = state
    else:  # keys "unet.<path>" / "text_encoder.<path>"
        for key, value in state.items():
            part, _, rest = key.partition(".")
            parts.setdefault(part, {})[rest] = value
    config = model.peft_config["default"]
    meta = {}
    for name in LORA_METADATA_FIELDS:
        value = getattr(config, name, None)
        if value is None or (name in ("rank_pattern", "alpha_pattern") and not value):
            continue
        meta[name] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return parts, meta


def save_diffusers_lora(model: nn.Module, folder: str) -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` (the UNet's LoRA and the text encoder's, when trained),
    loadable by ``pipe.load_lora_weights(folder)``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    parts, meta = diffusers_lora_state_dict(model)
    layers = {f"{part}_lora_layers": tensors for part, tensors in parts.items()}
    metadata = {f"{part}_lora_adapter_metadata": meta for part in parts}
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, **layers, **metadata, safe_serialization=True)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def save_diffusers_files(model: nn.Module, run_dir: str) -> str | None:
    """The run's adapter in diffusers' own format, where it has one: LoRA -> ``diffusers_lora/`` (for
    ``load_lora_weights``), textual inversion -> ``diffusers_textual_inversion/learned_embeds.safetensors``
    (for ``load_textual_inversion``); None for other methods."""
    config = model.peft_config["default"]
    if isinstance(config, TextualInversionConfig):
        return save_textual_inversion(model, None, os.path.join(run_dir, "diffusers_textual_inversion"))
    if isinstance(config, LoraConfig):
        return save_diffusers_lora(model, os.path.join(run_dir, "diffusers_lora"))
    return None
