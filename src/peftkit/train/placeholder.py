"""Textual inversion in the diffusion tasks: the placeholder's words in the task's text encoder.

The text encoder is the one task diffusion builds over the data's class prompts (same vocabulary, same length,
same seed-0 weights, so a UNet trained by task diffusion on the same data reads the same encoder), or the one the
base was saved with (``unet-tiny-digits``), plus the placeholder's words. The method's own checks run before anything is built (``check_tokenizer``: a placeholder
already in the vocabulary, or an initializer that is not one word, is a ``ConfigError`` naming the ``peft.``
field); the placeholder's ids and the initializer's are written into the recipe's ``peft`` fields
(``token_indices``, ``initializer_index``; kept in the run's ``config.yaml``), and the method's
``prepare_model`` grows the embedding with the initializer's row, so the adapter-off model reads the
placeholder as its initializer word.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError
from ..methods.textual_inversion import TextualInversionAdapter, TextualInversionConfig, multi_vector_prompt
from ..methods.textual_inversion.tokens import check_tokenizer
from .diffusion import PromptEncoder, prompt_for
from .diffusion_spec import is_textual_inversion


def prompt_encoder(task: Any, prompts: list[str], hidden_size: int,
                   class_names: list[str]) -> tuple[PromptEncoder, list[str]]:
    """The run's frozen text encoder over ``prompts``, and the prompts as it reads them; with textual inversion,
    the class prompts' encoder plus the placeholder (see the module docstring), and the prompts with a
    multi-vector placeholder spelled out (``<tok> <tok>_1 ...``)."""
    recipe = task.recipe
    if not is_textual_inversion(recipe.method):
        return task.prompt_encoder(prompts, hidden_size), prompts
    config = TextualInversionConfig(**{k: v for k, v in recipe.peft.items() if k != "token_indices"})
    names = config.placeholder_names
    spelled = [multi_vector_prompt(p, config.placeholder_token, config.num_vectors) for p in prompts]
    base = [prompt_for(name) for name in class_names]
    known = {w for p in base for w in p.split()}
    other = sorted({w for p in spelled for w in p.split()} - known - set(names))
    length = max(len(p.split()) for p in base + spelled) + 1
    encoder = task.prompt_encoder(base + [" ".join(other)] if other else base, hidden_size, length=length)
    words = _checked_words(encoder, config)
    encoder.tokenizer.add_tokens(words)
    ids = [encoder.tokenizer.token_to_id(w) for w in words]
    given = recipe.peft.get("token_indices")
    if given is not None and list(given) != ids:
        raise ConfigError(f"peft.token_indices: the text encoder gives the placeholder's words {words} the ids {ids}, "
                          f"got {given} (leave it out: the run fills it)")
    recipe.peft.update(token_indices=ids, initializer_index=config.initializer_index)
    filled = TextualInversionConfig(**recipe.peft)
    TextualInversionAdapter.prepare_model(encoder.model, filled)  # grow the embedding: initializer rows
    return encoder, spelled


def _checked_words(encoder: PromptEncoder, config: TextualInversionConfig) -> list[str]:
    """The placeholder's words, none in the vocabulary (and the initializer one word), as the method checks them;
    errors name the recipe's ``peft.`` field. Fills ``config.initializer_index``."""
    from transformers import PreTrainedTokenizerFast

    try:
        words, start = check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=encoder.tokenizer), config)
    except ConfigError as exc:
        raise ConfigError("peft." + str(exc).removeprefix(f"{type(config).__name__}.")) from None
    config.initializer_index = start
    return words
