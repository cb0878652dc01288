"""The model a diffusion task hands to the method, per the recipe's ``diffusion.adapt``.

``diffusion.adapt: [unet]`` (the default): the UNet itself, and ``task.cond`` holds the prompts' hidden states,
computed once by the frozen text encoder. Any other choice: a :class:`TextToImage` holding the adapted
components as submodules (named as in a diffusers pipeline: ``unet``, ``text_encoder``, so an adapter's keys
read ``unet.down_blocks...`` / ``text_encoder.text_model...``) and the others beside them, frozen and outside
the module tree (the method never sees them, ``.to()`` / ``.train()`` still reach them). ``task.cond`` then holds
the prompts' token ids (N, L), and the wrapper runs the text encoder on them in every call, so its adapter is in
the graph: training, sampling and the adapter-off grid all go through it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class TextToImage(nn.Module):
    """A UNet and its text encoder as one model; only the components in ``adapt`` are submodules."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, adapt: list[str] | tuple[str, ...]) -> None:
        super().__init__()
        self.adapt = tuple(adapt)
        self._held: dict[str, nn.Module] = {}
        for name, module in (("unet", unet), ("text_encoder", text_encoder)):
            if name in self.adapt:
                self.add_module(name, module)
            else:
                self._held[name] = module.requires_grad_(False)
                self.__dict__[name] = module  # an attribute, not a submodule: no method targets it

    def forward(self, sample: Tensor, timestep: Any, encoder_hidden_states: Tensor, **kwargs: Any) -> Any:
        """The UNet's output. ``encoder_hidden_states``: hidden states (N, L, D), used as they are, or token ids
        (N, L) (an integer tensor), which the text encoder (with its adapter) encodes first."""
        if not encoder_hidden_states.is_floating_point():
            encoder_hidden_states = self.text_encoder(input_ids=encoder_hidden_states).last_hidden_state
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.text_encoder.get_input_embeddings()

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Module:
        return self.text_encoder.resize_token_embeddings(new_num_tokens)

    def _apply(self, fn: Any, recurse: bool = True) -> "TextToImage":
        for module in self._held.values():
            module._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "TextToImage":
        for module in self._held.values():
            module.train(mode)
        return super().train(mode)


def adapted_model(task: Any, unet: nn.Module) -> nn.Module:
    """The module the recipe's method wraps: ``unet`` itself, or a :class:`TextToImage` over ``unet`` and
    ``task.encoder.model`` (then ``task.cond`` becomes the token ids of ``task.prompts``)."""
    adapt = list(task.recipe.diffusion.adapt)
    if adapt == ["unet"]:
        return unet
    task.cond = task.encoder.ids(task.prompts)
    return TextToImage(unet, task.encoder.model, adapt)
