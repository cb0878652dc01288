"""The recipe's ``diffusion:`` section (tasks ``diffusion`` and ``dreambooth``): which components of the
text-to-image model the method adapts.

``adapt`` lists them: ``unet`` (the default: the method wraps the UNet alone, as before), ``text_encoder``
(the method wraps the frozen tiny CLIP text encoder; the UNet stays frozen beside it) or both (one adapter over
the two, e.g. DreamBooth-LoRA with LoRA on the text encoder too, diffusers' ``--train_text_encoder``). Textual
inversion trains rows of the text encoder's token embedding, so it needs ``text_encoder`` here, and its
``peft.placeholder_token`` must occur in the prompt it is trained with (task dreambooth's
``dreambooth.instance_prompt``; task diffusion's prompts are the class names' and cannot hold it). How the model
is put together: :mod:`peftkit.train.text_to_image`.

Also the ``ip_adapter:`` section (task ``diffusion`` with method ``ip_adapter``, :mod:`peftkit.train.ip_adapter_task`):
``image_dropout``, the probability that a training row's image prompt is dropped, replaced by a zero image
embedding, so that the adapter also learns the unconditional case classifier-free guidance needs (IP-Adapter, Ye et
al. 2023, arXiv 2308.06721, section 4.1: 0.05).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..methods.textual_inversion import TextualInversionConfig
from ..registry import get_method

COMPONENTS = ("unet", "text_encoder")
TASKS = ("diffusion", "dreambooth")
IP_ADAPTER_METHODS = ("ip_adapter",)  # task diffusion runs them with IPAdapterDiffusionTask (diffusion.METHOD_TASKS)


@dataclass
class DiffusionSpec:
    """The recipe's ``diffusion:`` section."""

    adapt: list[str] = field(default_factory=lambda: ["unet"])  # unet, text_encoder, or both


@dataclass
class IPAdapterSpec:
    """The recipe's ``ip_adapter:`` section (read by task diffusion with method ip_adapter only)."""

    image_dropout: float = 0.05  # a training row's image prompt is a zero embedding with this probability


def ip_adapter_problem(recipe: Any) -> str | None:
    """What is wrong with the ``ip_adapter:`` fields (led by the dotted YAML path), or None."""
    spec = recipe.ip_adapter
    if recipe.task != "diffusion" or recipe.method not in IP_ADAPTER_METHODS:
        if spec != IPAdapterSpec():
            return (f"ip_adapter: read by task diffusion with method {' or '.join(IP_ADAPTER_METHODS)}; got task "
                    f"{recipe.task}, method {recipe.method}")
        return None
    p = spec.image_dropout
    if not math.isfinite(p) or not 0 <= p < 1:
        return f"ip_adapter.image_dropout: expected a probability in [0, 1), got {p}"
    return None


def is_textual_inversion(method: str) -> bool:
    try:
        return issubclass(get_method(method).config_cls, TextualInversionConfig)
    except KeyError:
        return False  # an unknown method is reported as the method field's error


def diffusion_problem(recipe: Any) -> str | None:
    """What is wrong with the ``diffusion:`` fields (led by the dotted YAML path), or None."""
    spec = recipe.diffusion
    if recipe.task not in TASKS:
        if spec != DiffusionSpec():
            return f"diffusion: only tasks {' and '.join(TASKS)} read it (task {recipe.task})"
        return None
    adapt = spec.adapt
    if not adapt:
        return f"diffusion.adapt: expected one or both of {', '.join(COMPONENTS)}, got []"
    for name in adapt:
        if name not in COMPONENTS:
            return f"diffusion.adapt: expected names among {', '.join(COMPONENTS)}, got {name!r}"
        if adapt.count(name) > 1:
            return f"diffusion.adapt: {name!r} is listed twice"
    if not is_textual_inversion(recipe.method):
        return None
    if "text_encoder" not in adapt:
        return (f"diffusion.adapt: method {recipe.method} trains rows of the text encoder's token embedding; "
                f"expected text_encoder in it, got {adapt}")
    token = recipe.peft.get("placeholder_token")
    if not isinstance(token, str) or not token.strip():
        return f"peft.placeholder_token: expected the new word the run learns (e.g. '<digit7>'), got {token!r}"
    if recipe.task != "dreambooth":
        return (f"task: {recipe.method} learns a word for one subject's images; task dreambooth trains on them "
                "(dreambooth.subject, dreambooth.instance_prompt holding the placeholder), task diffusion's "
                "prompts are the class names'")
    if token not in recipe.dreambooth.instance_prompt.split():
        return (f"dreambooth.instance_prompt: expected the placeholder {token!r} (peft.placeholder_token) as a word "
                f"of it, got {recipe.dreambooth.instance_prompt!r}")
    return None
